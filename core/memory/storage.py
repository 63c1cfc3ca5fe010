"""What a model part's weights really occupy: parameter counts and the bytes of real storage.

Used by the quantization (its before/after report), the quantization cache and the run record
(core/train/run_info.py); it sits in core/memory so that those lower layers need nothing above them.

Measuring quantized storage. `Tensor.nbytes`, `numel() * element_size()` and even
`untyped_storage().nbytes()` report the *logical* full-precision size for optimum-quanto's tensors
(a qfloat8 weight of a float32 Linear reports 4 bytes per element). `part_summary` therefore walks
the real storage:
- tensor subclasses that follow PyTorch's wrapper-subclass protocol (`__tensor_flatten__`: quanto's
  WeightQBytesTensor / WeightQBitsTensor / PackedTensor, torchao's tensors, DTensor shards) are
  measured through their inner tensors, recursively (quanto: `_data` + `_scale` (+ `_shift`));
- bitsandbytes parameters (Params4bit, Int8Params) are ordinary Parameters holding the packed data,
  plus side tensors: `quant_state` (absmax, code, offset, and a nested state with its own absmax and
  code when compress_statistics is on) and `SCB`/`CB` for 8-bit; those side tensors are added;
- every storage is counted once, by the bytes its tensors actually cover, so tied weights and views
  into one buffer are not counted twice.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any


class _StorageCounter:
    """Bytes of real storage covered by the tensors added, each byte counted once."""

    def __init__(self) -> None:
        self.total = 0
        self.by_dtype: dict[str, int] = {}
        self.by_device: dict[str, int] = {}
        self._covered: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self._seen: set[int] = set()

    def add(self, tensor: Any) -> int:
        """Add a tensor (any kind); return the bytes it added that were not counted before."""
        if id(tensor) in self._seen:
            return 0
        self._seen.add(id(tensor))
        added = 0
        for leaf in _storage_leaves(tensor):
            added += self._add_leaf(leaf)
        return added

    def _add_leaf(self, tensor: Any) -> int:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            return 0  # no real storage
        element = tensor.element_size()
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
        except (RuntimeError, NotImplementedError):  # an exotic tensor without a plain storage
            key = (str(tensor.device), -id(tensor))
        if key[1] == 0:
            key = (str(tensor.device), -id(tensor))
        # The bytes of the storage this tensor can reach: offset .. offset + extent.
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
        start = tensor.storage_offset() * element
        new = _add_interval(self._covered.setdefault(key, []), start, start + extent * element)
        if new:
            self.total += new
            dtype = str(tensor.dtype).removeprefix("torch.")
            self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + new
            device = str(tensor.device)
            self.by_device[device] = self.by_device.get(device, 0) + new
        return new


def _add_interval(intervals: list[tuple[int, int]], start: int, end: int) -> int:
    """Merge [start, end) into sorted disjoint intervals; return how many bytes were new."""
    covered = 0
    merged_start, merged_end = start, end
    keep = []
    for a, b in intervals:
        if b < start or a > end:
            keep.append((a, b))
            continue
        covered += max(0, min(b, end) - max(a, start))
        merged_start, merged_end = min(merged_start, a), max(merged_end, b)
    keep.append((merged_start, merged_end))
    keep.sort()
    intervals[:] = keep
    return (end - start) - covered


def _is_wrapper_subclass(tensor: Any) -> bool:
    try:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    except ImportError:  # an older torch: the protocol's method is the tell
        return hasattr(type(tensor), "__tensor_flatten__")
    return is_traceable_wrapper_subclass(tensor)


def _storage_leaves(tensor: Any) -> Iterator[Any]:
    """The plain tensors that hold a (possibly quantized) tensor's data and its scales."""
    if _is_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        for name in inner_names:
            inner = getattr(tensor, name)
            if _is_tensor(inner):  # a sharded DTensor (FSDP) also names its device mesh: the local shard counts
                yield from _storage_leaves(inner)
        return
    yield tensor
    # bitsandbytes: Params4bit.quant_state (absmax, code, offset, nested state2), Int8Params.SCB/CB.
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:
        yield from _quant_state_tensors(quant_state, depth=0)
    for name in ("SCB", "CB"):
        side = getattr(tensor, name, None)
        if _is_tensor(side):
            yield from _storage_leaves(side)


def _quant_state_tensors(state: Any, depth: int) -> Iterator[Any]:
    if depth > 4:
        return
    for value in vars(state).values() if hasattr(state, "__dict__") else ():
        if _is_tensor(value):
            yield from _storage_leaves(value)
        elif type(value).__name__ == "QuantState":
            yield from _quant_state_tensors(value, depth + 1)


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _logical_numel(parameter: Any) -> int:
    """Elements of the full-precision tensor a parameter stands for (bnb 4-bit packs two per byte)."""
    quant_state = getattr(parameter, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        count = 1
        for size in shape:
            count *= int(size)
        return count
    return parameter.numel()


def _quantization_format(tensor: Any) -> str | None:
    """A name for a quantized storage format, or None for a plain tensor."""
    qtype = getattr(tensor, "qtype", None)  # optimum-quanto
    if qtype is not None:
        return str(getattr(qtype, "name", qtype))
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit
    if quant_state is not None:
        return str(getattr(quant_state, "quant_type", "bnb-4bit"))
    if getattr(tensor, "SCB", None) is not None:  # bitsandbytes 8-bit
        return "bnb-int8"
    if _is_wrapper_subclass(tensor):
        return type(tensor).__name__
    return None


def part_summary(module: Any) -> dict[str, Any]:
    """Parameter counts and real storage bytes of a model part (a torch.nn.Module).

    - parameters / trainable_parameters: elements of the module's unique Parameter objects, all and
      those with requires_grad (as `sum(p.numel() for p in module.parameters())` counts; quantized
      weights count their full-precision element count, bitsandbytes' packed ones included).
    - weight_bytes: bytes of real storage of parameters and buffers together: quantized data plus
      scales, each storage once (tied weights, views); meta tensors count 0.
    - bytes_by_dtype: weight_bytes split by the storage's dtype ("float8_e4m3fn", "uint8" for packed
      4-bit data, "float32" for scales, ...). bytes_by_device: split by device ("cpu", "cuda:0").
    - quantized_bytes_by_format: the part of weight_bytes held by quantized tensors (data and their
      scales), by format ("qfloat8_e4m3fn", "qint4", "nf4", "fp4", "bnb-int8"); {} if none.
    """
    counter = _StorageCounter()
    parameters = trainable = 0
    quantized: dict[str, int] = {}
    for parameter in module.parameters():
        count = _logical_numel(parameter)
        parameters += count
        if parameter.requires_grad:
            trainable += count
        added = counter.add(parameter)
        fmt = _quantization_format(parameter)
        if fmt is not None and added:
            quantized[fmt] = quantized.get(fmt, 0) + added
    for buffer in module.buffers():
        added = counter.add(buffer)
        fmt = _quantization_format(buffer)
        if fmt is not None and added:
            quantized[fmt] = quantized.get(fmt, 0) + added
    return {
        "parameters": parameters,
        "trainable_parameters": trainable,
        "weight_bytes": counter.total,
        "bytes_by_dtype": dict(sorted(counter.by_dtype.items())),
        "bytes_by_device": dict(sorted(counter.by_device.items())),
        "quantized_bytes_by_format": dict(sorted(quantized.items())),
    }
