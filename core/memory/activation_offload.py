"""gradient_checkpointing CPU_OFFLOADED: what the forward pass saves for the backward waits in CPU memory.

With gradient checkpointing (diffusers' non-reentrant torch.utils.checkpoint) the forward pass keeps,
per transformer block, only the block's inputs; they are saved as autograd saved tensors, so
saved-tensor hooks around the forward see them. ActivationOffload packs each saved tensor into
(pinned) CPU memory and unpacks it to its device when the backward pass needs it, which is what
torch.autograd.graph.save_on_cpu does (its pack/unpack functions do the copying here), with three
changes for this use:

- a tensor saved several times is copied once: every block saves the same text embeddings,
  timestep projection and rotary tables (for a model with per-token timesteps that projection is
  tokens x 6 x width, as large as the residual stream), so save_on_cpu would hold N copies;
- parameters are not copied: a frozen weight saved outside the blocks is on the GPU anyway;
- it counts what it moved (offloaded_tensors, offloaded_bytes), for telemetry and tests.

The recomputation in the backward pass runs outside the context, so the one block being
recomputed keeps its activations on the GPU, as it must. Use it around the forward only:

    with ActivationOffload():
        prediction = adapter.predict(...)
    loss.backward()
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

log = logging.getLogger(__name__)

_KEEP = "keep"


def _saved_tensors_hooks_base() -> type:
    import torch

    return torch.autograd.graph.saved_tensors_hooks


class ActivationOffload(_saved_tensors_hooks_base()):  # type: ignore[misc]
    """Saved-tensor hooks that keep what the forward pass saves in CPU memory until the backward.

    pin_memory: page-locked host buffers (default: when CUDA is available), so the copies back to
    the GPU can be asynchronous. include_cpu: also copy tensors that are already on the CPU, so the
    bookkeeping can be tested on a machine without a GPU (the values are the same either way).
    """

    def __init__(self, pin_memory: bool | None = None, *, include_cpu: bool = False) -> None:
        import torch

        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.pin_memory = pin_memory
        self.include_cpu = include_cpu
        self.saved_tensors = 0  # every tensor autograd asked to save
        self.offloaded_tensors = 0  # distinct tensors copied to the CPU
        self.offloaded_bytes = 0
        self._library = torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)
        # id(tensor) -> (weak reference, packed): a hit only while the same tensor object is alive.
        self._copies: dict[int, tuple[Any, Any]] = {}
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: Any) -> Any:
        import torch

        self.saved_tensors += 1
        if (isinstance(tensor, torch.nn.Parameter) or tensor.layout != torch.strided
                or (tensor.device.type == "cpu" and not self.include_cpu) or type(tensor) is not torch.Tensor):
            return (_KEEP, tensor)
        known = self._copies.get(id(tensor))
        if known is not None and known[0]() is tensor:
            return known[1]
        packed = self._library.pack_hook(tensor)
        if tensor.device.type == "cpu":
            device, host = packed
            if host is tensor:  # save_on_cpu hands a CPU tensor back as it is; copy it so tests see real moves
                packed = (device, tensor.clone())
        self.offloaded_tensors += 1
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        self._copies[id(tensor)] = (weakref.ref(tensor), packed)
        return packed

    def _unpack(self, packed: Any) -> Any:
        if packed[0] == _KEEP:
            return packed[1]
        return self._library.unpack_hook(packed)

    def __enter__(self) -> ActivationOffload:  # noqa: PYI034  (typing.Self needs Python 3.11)
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._copies.clear()  # the packed copies live on in autograd's graph, not here
        log.debug("activation offload: %d saved tensors, %d copied to the CPU (%.1f MiB)",
                  self.saved_tensors, self.offloaded_tensors, self.offloaded_bytes / 2**20)


def activation_offload(gradient_checkpointing: str, pin_memory: bool | None = None) -> Any:
    """The context to wrap the forward pass in for a gradient_checkpointing setting: an
    ActivationOffload for CPU_OFFLOADED, a no-op context otherwise."""
    import contextlib

    if gradient_checkpointing == "CPU_OFFLOADED":
        return ActivationOffload(pin_memory)
    return contextlib.nullcontext()
