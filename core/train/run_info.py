"""run_info.json: what a training run was started with, written once at its start.

The record answers "what exactly ran here?" for a bug report or a comparison between runs: the
resolved settings, the machine, the library versions, the app version, the start time, and for each
model part its parameter counts and the bytes its weights really occupy (quantized weights included).

Measuring quantized storage: `part_summary` (core/memory/storage.py).
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
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.atomic import explained_write_errors, write_json_atomic
from core.memory.storage import part_summary

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
