"""run_info.json: what a training run was started with, written once at its start.

The record answers "what exactly ran here?" for a bug report or a comparison between runs: the
resolved settings, the machine, the library versions, the app version, the start time, and for each
model part its parameter counts and the bytes its weights really occupy (quantized weights included).

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

import enum
import importlib.metadata
import logging
import math
import os
import platform
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.atomic import explained_write_errors, write_json_atomic

log = logging.getLogger(__name__)

RUN_INFO_FILE_NAME = "run_info.json"
RUN_INFO_VERSION = 1
APP_DISTRIBUTION = "video-trainer"
# Distribution names (as pip knows them) whose versions go into run_info.json.
LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "optimum-quanto",
    "bitsandbytes",
    "safetensors",
    "av",
    "numpy",
    "tensorboard",
    "opencv-python-headless",
    "PySide6",
)
# A PySide6 install may be the full distribution or only the Essentials one that pyproject names.
_ALTERNATIVE_DISTRIBUTIONS = {"PySide6": ("PySide6", "PySide6-Essentials")}


# --------------------------------------------------------------------------------------------------
# Part summaries


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
            yield from _storage_leaves(getattr(tensor, name))
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


# --------------------------------------------------------------------------------------------------
# Machine and versions


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions by distribution name (from package metadata, nothing is imported)."""
    versions: dict[str, str | None] = {}
    for name in names:
        versions[name] = None
        for candidate in _ALTERNATIVE_DISTRIBUTIONS.get(name, (name,)):
            try:
                versions[name] = importlib.metadata.version(candidate)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def app_version() -> str:
    """The installed video-trainer version, else the one in the source tree's pyproject.toml."""
    try:
        return importlib.metadata.version(APP_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    match = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1) if project else "", re.MULTILINE)
    return match.group(1) if match else "unknown"


def _total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil is optional; ask the OS below
        log.debug("psutil cannot tell the RAM size", exc_info=True)
    if sys.platform.startswith("linux"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None
    if sys.platform == "win32":
        try:
            import ctypes

            class MEMORYSTATUSEX(ctypes.Structure):  # the Win32 name
                _fields_ = [
                    ("dwLength", ctypes.c_ulong),
                    ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong),
                    ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong),
                    ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong),
                    ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
                ]

            status = MEMORYSTATUSEX()
            status.dwLength = ctypes.sizeof(status)
            if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
                return int(status.ullTotalPhys)
        except (OSError, AttributeError):
            return None
    return None


def device_info() -> dict[str, Any]:
    """torch build, CUDA/ROCm devices with their memory, CPU count, RAM and platform."""
    import torch

    gpus = []
    cuda_available = torch.cuda.is_available()
    if cuda_available:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "index": index,
                    "name": props.name,
                    "total_memory_bytes": int(props.total_memory),
                    "capability": f"{props.major}.{props.minor}",
                    "multiprocessors": int(props.multi_processor_count),
                }
            )
    return {
        "torch": torch.__version__,
        "cuda_available": cuda_available,
        "cuda_version": torch.version.cuda,
        "hip_version": getattr(torch.version, "hip", None),
        "cudnn_version": torch.backends.cudnn.version() if cuda_available else None,
        "gpus": gpus,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _total_ram_bytes(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }


# --------------------------------------------------------------------------------------------------
# The file


def _jsonable(value: Any) -> Any:
    """Settings as JSON: paths and dtypes as strings, enums by name, tuples and sets as lists."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=str)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def write_run_info(
    workspace_dir: str | os.PathLike,
    config: Mapping[str, Any],
    parts: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    started_at: datetime | None = None,
) -> Path:
    """Write workspace_dir/run_info.json atomically and return its path.

    config: the resolved settings. parts: model part name -> torch.nn.Module (each summarised by
    `part_summary`). extra: more top-level fields (the resume step, the dataset plan, ...); they may
    not replace the fields written here. started_at: defaults to now (local time, with its offset).
    """
    started = (started_at or datetime.now(timezone.utc)).astimezone()
    info: dict[str, Any] = {
        "run_info_version": RUN_INFO_VERSION,
        "app_version": app_version(),
        "started_at": started.isoformat(timespec="seconds"),
        "settings": _jsonable(dict(config)),
        "devices": device_info(),
        "libraries": library_versions(),
        "parts": {str(name): part_summary(module) for name, module in parts.items()},
    }
    for key, value in (extra or {}).items():
        if key in info:
            raise ValueError(f"run_info extra field {key!r} would replace a field of its own")
        info[str(key)] = _jsonable(value)
    path = Path(workspace_dir) / RUN_INFO_FILE_NAME
    with explained_write_errors(path, "the run record", key="workspace_dir"):
        return write_json_atomic(path, info)
