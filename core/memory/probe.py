"""Memory probes: the peak bytes of live tensors, on any device, CPU included.

On a GPU, torch.cuda.max_memory_allocated() is the measure the VRAM estimator predicts. Without a
GPU, TensorMemoryProbe measures the same quantity for CPU tensors: the bytes of all tensor storages
alive at once, at their highest, counting storages that existed before (what track() is given:
the model, the optimizer state, the inputs) and those created by operations inside the context
(forward, backward and optimizer step). It does not see allocator rounding or fragmentation, which
the estimator adds as documented constants.

It is a TorchDispatchMode: every operator's outputs are registered once per storage, and a
storage is released when its Python object is finalized (PyTorch keeps one Python object per
storage for as long as the storage lives).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryProbe(TorchDispatchMode):
    """with TensorMemoryProbe() as probe: ...; probe.peak["cpu"] is the most bytes alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._known: set[int] = set()

    def track(self, *things: Any) -> TensorMemoryProbe:
        """Count tensors that already exist: modules (parameters, buffers), optimizers (state), tensors."""
        import torch

        for thing in things:
            for tensor in _tensors_of(thing):
                if isinstance(tensor, torch.Tensor):
                    self._add(tensor)
        return self

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        import torch

        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out

    def _add(self, tensor: Any) -> None:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                self._add(getattr(tensor, name))
            return
        if tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage._cdata
        if key in self._known or storage.nbytes() == 0:
            return
        device, size = str(tensor.device.type), storage.nbytes()
        self._known.add(key)
        self.live[device] = self.live.get(device, 0) + size
        self.peak[device] = max(self.peak.get(device, 0), self.live[device])
        weakref.finalize(storage, self._release, key, device, size)

    def _release(self, key: int, device: str, size: int) -> None:
        self._known.discard(key)
        self.live[device] -= size


def _tensors_of(thing: Any) -> Iterable[Any]:
    import torch

    if isinstance(thing, torch.nn.Module):
        yield from thing.parameters()
        yield from thing.buffers()
    elif isinstance(thing, torch.optim.Optimizer):
        for state in thing.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    elif isinstance(thing, torch.Tensor):
        yield thing
    elif isinstance(thing, (list, tuple)):
        for item in thing:
            yield from _tensors_of(item)
