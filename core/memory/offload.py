"""The layer-offload conductor: layer_offload_fraction of the transformer's blocks live in CPU memory.

The blocks are those of the stacks the model family names (ModelAdapter.block_stacks: one
nn.ModuleList, or two, such as dual-stream then single-stream blocks), numbered in the order the
forward pass runs them, as one sequence. For a fraction f of n blocks
over all the stacks, ceil(f * n) blocks, spread evenly over that sequence, keep their frozen
weights in (pinned, with CUDA) CPU memory. A forward pre-hook on every block makes the block's
weights resident on the GPU before it runs and starts copying the next offloaded block in the
direction of travel, so the copy overlaps the compute of the blocks in between:

- forward and backward: gradient checkpointing recomputes each block's forward during the
  backward pass through the block's own __call__, so the same hook serves both (the backward
  visits the blocks in reverse: the direction flips when a block is entered twice in a row);
- host to device only: the GPU copy of a frozen tensor is dropped when its block leaves the ring
  (the module points back at the CPU master), never copied back (musubi-tuner's finding: about 25%
  faster than swapping both ways);
- a ring of `slots` resident offloaded blocks (default 2: the running one and the one being
  copied); a new copy evicts the least recently used;
- copies run on a side CUDA stream; the compute stream waits on the copy's event before the block
  runs, and the copied tensors are marked with record_stream so the caching allocator does not
  reuse their memory while the compute stream may still read it;
- trainable parameters (the LoRA) never move: they stay on the GPU, as does everything outside the
  offloaded blocks;
- quantized weights travel in their stored form: optimum-quanto tensors through their inner
  tensors (__tensor_flatten__), bitsandbytes Params4bit with a copy of its quant_state.

It needs gradient checkpointing (offload_config_problem says so): without it autograd keeps every
block's GPU weights alive until the backward pass and nothing is saved.

Without CUDA the same code runs with device "cpu": the "GPU copy" is a clone and there is no
stream, so the bookkeeping (trace, bytes_moved) and the numerics can be tested anywhere.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import OrderedDict
from typing import Any

from core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 2


def offloaded_block_count(fraction: float, n_blocks: int) -> int:
    """Blocks offloaded for layer_offload_fraction: ceil(fraction * n_blocks), so any fraction above 0
    offloads at least one block."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"layer_offload_fraction must be between 0 and 1, not {fraction}")
    return min(n_blocks, math.ceil(fraction * n_blocks - 1e-9))


def offloaded_block_indices(fraction: float, n_blocks: int) -> list[int]:
    """Which blocks are offloaded: spread evenly, so each copy has resident blocks' compute to hide behind."""
    m = offloaded_block_count(fraction, n_blocks)
    return [int((k + 0.5) * n_blocks / m) for k in range(m)]


def offload_config_problem(config: dict[str, Any]) -> ConfigError | None:
    """The error for a config that asks for offloading without gradient checkpointing, else None."""
    if config.get("layer_offload_fraction", 0) > 0 and config.get("gradient_checkpointing") == "OFF":
        return ConfigError(
            f"layer_offload_fraction {config['layer_offload_fraction']} needs gradient_checkpointing ON or "
            "CPU_OFFLOADED: without it every block's weights stay on the GPU until the backward pass",
            key="gradient_checkpointing", also=("layer_offload_fraction",),
        )
    return None


# --------------------------------------------------------------------------------------------------
# Moving one tensor, whatever its kind


def _is_wrapper(tensor: Any) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(tensor)


def _leaves(tensor: Any) -> list[Any]:
    """The plain tensors holding a (possibly quantized) tensor's data."""
    if _is_wrapper(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [leaf for name in names for leaf in _leaves(getattr(tensor, name))]
    quant_state = getattr(tensor, "quant_state", None)
    extra = _quant_state_leaves(quant_state) if quant_state is not None else []
    return [tensor.data if hasattr(tensor, "data") else tensor, *extra]


def _quant_state_leaves(state: Any) -> list[Any]:
    import torch

    out = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif type(value).__name__ == "QuantState":
            out.extend(_quant_state_leaves(value))
    return out


def tensor_bytes(tensor: Any) -> int:
    """Bytes that moving tensor copies: its data and scales (quantized storage as stored)."""
    return sum(leaf.numel() * leaf.element_size() for leaf in _leaves(tensor))


def _apply(tensor: Any, fn: Any) -> Any:
    """tensor rebuilt with fn applied to each plain tensor inside it (quanto, bitsandbytes, plain)."""
    if _is_wrapper(tensor):
        names, ctx = tensor.__tensor_flatten__()
        inner = {name: _apply(getattr(tensor, name), fn) for name in names}
        return type(tensor).__tensor_unflatten__(inner, ctx, tensor.size(), tensor.stride())
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes as bnb

        return bnb.nn.Params4bit(
            fn(tensor.data), requires_grad=False, quant_state=_apply_quant_state(quant_state, fn),
            blocksize=tensor.blocksize, compress_statistics=tensor.compress_statistics, quant_type=tensor.quant_type,
            quant_storage=tensor.quant_storage, module=tensor.module, bnb_quantized=True,
        )
    return fn(tensor.data if hasattr(tensor, "data") else tensor)


def _apply_quant_state(state: Any, fn: Any) -> Any:
    import torch

    new = copy.copy(state)  # shallow: bitsandbytes' QuantState.to() moves in place, which would move the master's
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            setattr(new, name, fn(value))
        elif type(value).__name__ == "QuantState":
            setattr(new, name, _apply_quant_state(value, fn))
    return new


def _as_parameter(tensor: Any) -> Any:
    import torch

    if isinstance(tensor, torch.nn.Parameter):
        return tensor
    return torch.nn.Parameter(tensor, requires_grad=False)


# --------------------------------------------------------------------------------------------------
# The offloader


class _Block:
    """One offloaded block: where its frozen tensors live in the module, and their CPU masters."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.entries: list[tuple[Any, str, bool, Any]] = []  # (module, name, is_parameter, cpu master)
        self.bytes = 0


class BlockOffloader:
    """Streams the frozen weights of some of `blocks` to `device` as they are needed. `blocks` is one
    stack (an nn.ModuleList) or the model's stacks in forward order (ModelAdapter.block_stacks), whose
    blocks are numbered as one sequence: `offloaded`, `trace` and `resident` use that numbering.

    Use: build after quantizing, adding the LoRA and enabling gradient checkpointing, then attach()
    (which also moves everything not offloaded to device). bytes_moved counts host-to-device bytes
    since the last take_bytes_moved(). With record_trace, `trace` lists (event, block, detail):
    "load" (detail "prefetch" or "demand"), "evict", "run" (detail: the resident offloaded blocks).
    """

    def __init__(self, blocks: Any, fraction: float, device: Any, *, slots: int = DEFAULT_SLOTS,
                 pin_memory: bool | None = None, record_trace: bool = False, time_copies: bool = False) -> None:
        import torch

        if slots < 1:
            raise ValueError("the offloader needs at least one GPU slot")
        self.stacks = [blocks] if isinstance(blocks, torch.nn.Module) else list(blocks)
        self.blocks = [block for stack in self.stacks for block in stack]  # forward order, one numbering
        self._where = [(s, i) for s, stack in enumerate(self.stacks) for i in range(len(stack))]
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.slots = slots
        self.cuda = self.device.type == "cuda"
        self.pin_memory = self.cuda if pin_memory is None else pin_memory
        self.offloaded = offloaded_block_indices(fraction, len(self.blocks))
        self.bytes_moved = 0
        self.record_trace = record_trace
        # time_copies: time every host-to-device copy (CUDA events on the copy stream; a clock on a
        # CPU), for take_copy_seconds; off in training, where it would only cost.
        self.time_copies = time_copies
        self._timings: list[Any] = []  # (start event, end event) on CUDA, seconds on a CPU
        self.trace: list[tuple[str, int, Any]] = []
        self._blocks: dict[int, _Block] = {}
        self._resident: OrderedDict[int, tuple[list[Any], Any]] = OrderedDict()  # index -> (device tensors, event)
        self._hooks: list[Any] = []
        self._model: Any = None  # what attach() was given: ignored_tensor_names reads the stacks' names in it
        self._last: int | None = None
        self._direction = 1
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    # -- setup -------------------------------------------------------------------------------------
    def attach(self, model: Any | None = None) -> BlockOffloader:
        """Move model (default: only the blocks) to device except the offloaded blocks' frozen tensors,
        which go to CPU memory, and install the hooks."""
        import torch

        if self._hooks:
            raise RuntimeError("the offloader is already attached")
        offloaded_ids = {id(self.blocks[i]) for i in self.offloaded}
        for root in [model] if model is not None else self.stacks:
            _move_except(root, self.device, offloaded_ids)
        self._model = model
        for index in self.offloaded:
            block = _Block(index)
            for module in self.blocks[index].modules():
                for name, tensor, is_param in _own_tensors(module):
                    if tensor is None:
                        continue
                    if is_param and tensor.requires_grad:
                        tensor.data = tensor.data.to(self.device)  # trainable: resident, same Parameter object
                        continue
                    master = self._master(tensor)
                    block.entries.append((module, name, is_param, master))
                    block.bytes += tensor_bytes(master)
                    _install(module, name, is_param, master)
            self._blocks[index] = block
        for index, module in enumerate(self.blocks):
            self._hooks.append(module.register_forward_pre_hook(self._make_hook(index)))
        if self.cuda:
            torch.cuda.empty_cache()
        total = sum(b.bytes for b in self._blocks.values())
        log.info("layer offloading: %d of %d blocks (%.1f MiB of frozen weights) in CPU memory, %d GPU slots",
                 len(self.offloaded), len(self.blocks), total / 2**20, self.slots)
        return self

    def _master(self, tensor: Any) -> Any:
        def to_host(t: Any) -> Any:
            t = t.to("cpu")
            return t.pin_memory() if self.pin_memory else t

        return _as_parameter(_apply(tensor, to_host)) if tensor.device.type != "cpu" or self.pin_memory else tensor

    def detach(self, device: Any = None) -> None:
        """Remove the hooks; the offloaded blocks keep their CPU masters, or move to device if given."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._evict_all()
        if device is not None:
            for index in self.offloaded:
                self.blocks[index].to(device)

    def ignored_tensor_names(self, prefix: str | None = None) -> list[str]:
        """Names (as named_parameters/named_buffers of the model give them) of the offloaded tensors:
        for DistributedDataParallel._set_params_and_buffers_to_ignore_for_model, which must not
        broadcast CPU tensors. Taken from the model given to attach(); without one, `prefix`
        (default "blocks") stands for the one stack's name."""
        stack_names: dict[int, str] = {}
        if self._model is not None:
            stack_names = {id(m): n for n, m in self._model.named_modules()}
        names = []
        for index, block in self._blocks.items():
            stack, within = self._where[index]
            head = stack_names.get(id(self.stacks[stack])) if prefix is None else prefix
            head = "blocks" if head is None else head
            paths = {id(m): n for n, m in self.blocks[index].named_modules()}
            for module, name, _, _ in block.entries:
                path = paths[id(module)]
                names.append(".".join(p for p in (head, str(within), path, name) if p))
        return names

    # -- bookkeeping -------------------------------------------------------------------------------
    def take_bytes_moved(self) -> int:
        """Bytes copied to the device since the last call (the loop's offload_bytes_per_step)."""
        moved, self.bytes_moved = self.bytes_moved, 0
        return moved

    def take_copy_seconds(self) -> float | None:
        """Seconds the copy stream spent in host-to-device copies since the last call (waits for
        the copies still running); None unless built with time_copies. With take_bytes_moved, the
        copies' achieved bandwidth."""
        if not self.time_copies:
            return None
        timings, self._timings = self._timings, []
        if not self.cuda:
            return float(sum(timings))
        total = 0.0
        for start, end in timings:
            end.synchronize()
            total += start.elapsed_time(end) / 1000.0
        return total

    def block_bytes(self, index: int) -> int:
        return self._blocks[index].bytes

    def resident(self) -> list[int]:
        """Offloaded blocks whose weights are on the device now, least recently used first."""
        return list(self._resident)

    def _note(self, event: str, index: int, detail: Any = None) -> None:
        if self.record_trace:
            self.trace.append((event, index, detail))

    # -- the hook ----------------------------------------------------------------------------------
    def _make_hook(self, index: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            self._before(index)

        return hook

    def _before(self, index: int) -> None:
        if self._last is not None:
            self._direction = 1 if index > self._last else -1 if index < self._last else -self._direction
        self._last = index
        if index in self._blocks:
            self._use(index)
        following = self._next_offloaded(index)
        if following is not None and following not in self._resident:
            self._load(following, "prefetch", keep=index)
        if index in self._blocks:
            self._note("run", index, tuple(self._resident))

    def _next_offloaded(self, index: int) -> int | None:
        step = self._direction
        j = index + step
        while 0 <= j < len(self.blocks):
            if j in self._blocks:
                return j
            j += step
        return None

    def _use(self, index: int) -> None:
        import torch

        if index not in self._resident:
            self._load(index, "demand")
        tensors, event = self._resident[index]
        self._resident.move_to_end(index)
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for tensor in tensors:
                for leaf in _leaves(tensor):
                    leaf.record_stream(stream)
        for (module, name, is_param, _), tensor in zip(self._blocks[index].entries, tensors):
            _install(module, name, is_param, tensor)

    def _load(self, index: int, why: str, keep: int | None = None) -> None:
        import torch

        while len(self._resident) >= self.slots:
            victim = next((i for i in self._resident if i != keep), None)
            if victim is None:
                return  # a prefetch with no slot to spare (slots=1): the block loads when it runs
            self._evict(victim)
        block = self._blocks[index]

        def to_device(t: Any) -> Any:
            return t.to(self.device, non_blocking=self.cuda, copy=True)

        event = None
        if self.cuda:
            # No wait on the compute stream: memory freed by an eviction is protected by record_stream.
            with torch.cuda.stream(self._stream):
                start = torch.cuda.Event(enable_timing=True) if self.time_copies else None
                if start is not None:
                    start.record(self._stream)
                tensors = [_as_parameter(_apply(master, to_device)) if is_param else _apply(master, to_device)
                           for _, _, is_param, master in block.entries]
                event = torch.cuda.Event(enable_timing=self.time_copies)
                event.record(self._stream)
                if start is not None:
                    self._timings.append((start, event))
        else:
            began = time.perf_counter()
            tensors = [_as_parameter(_apply(master, to_device)) if is_param else _apply(master, to_device)
                       for _, _, is_param, master in block.entries]
            if self.time_copies:
                self._timings.append(time.perf_counter() - began)
        self._resident[index] = (tensors, event)
        self.bytes_moved += block.bytes
        self._note("load", index, why)

    def _evict(self, index: int) -> None:
        self._resident.pop(index)
        for module, name, is_param, master in self._blocks[index].entries:
            _install(module, name, is_param, master)
        self._note("evict", index)

    def _evict_all(self) -> None:
        for index in list(self._resident):
            self._evict(index)


def _own_tensors(module: Any) -> list[tuple[str, Any, bool]]:
    return [(n, p, True) for n, p in module._parameters.items()] + [(n, b, False) for n, b in module._buffers.items()]


def _install(module: Any, name: str, is_param: bool, tensor: Any) -> None:
    # Replacing the Parameter object (not its .data) leaves any autograd graph that saved the old one
    # intact, and works for quantized tensor subclasses whose .data cannot be swapped.
    if is_param:
        module._parameters[name] = tensor
    else:
        module._buffers[name] = tensor


def _on_device(tensor: Any, device: Any) -> bool:
    """Whether tensor is on device: "cpu:0" (a multi-process CPU job's device) is the CPU, as "cpu"."""
    import torch

    device = torch.device(device)
    return tensor.device.type == device.type and (tensor.device.type == "cpu" or tensor.device.index == device.index)


def _move_except(root: Any, device: Any, skip_ids: set[int]) -> None:
    """root.to(device) for every submodule except those in skip_ids (and what they contain)."""
    def visit(module: Any) -> None:
        if id(module) in skip_ids:
            return
        for name, tensor, is_param in _own_tensors(module):
            if tensor is None or _on_device(tensor, device):
                continue
            moved = tensor.to(device)
            if is_param:
                # A plain Parameter's .to() gives a plain Tensor (a non-leaf, for a trainable one):
                # its data moves instead.
                if not _is_wrapper(tensor) and getattr(tensor, "quant_state", None) is None:
                    tensor.data = moved  # keeps the Parameter object (an optimizer may hold it)
                else:
                    module._parameters[name] = _as_parameter(moved) if not tensor.requires_grad else moved
            else:
                module._buffers[name] = moved
        for child in module.children():
            visit(child)

    import torch

    visit(root)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)
