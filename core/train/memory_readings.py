"""What a step record says about memory: CUDA allocator figures and the process's resident set.

The fields are described in docs/training.md (metrics.jsonl). Readings are cheap enough to take
every optimizer step.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

MEMORY_FIELDS = ("cuda_allocated_bytes", "cuda_reserved_bytes", "cuda_peak_bytes", "process_rss_bytes")


_PROCESS: dict[int, Any] = {}


def _this_process(psutil: Any) -> Any:
    # psutil.Process() reads /proc/<pid>/stat to identify the process every time it is made: the
    # largest part of a step record's cost. One per pid (a forked child gets its own).
    pid = os.getpid()
    if pid not in _PROCESS:
        _PROCESS[pid] = psutil.Process(pid)
    return _PROCESS[pid]


def process_rss_bytes() -> int | None:
    """Resident set size of this process in bytes (psutil if installed, else the OS directly)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(_this_process(psutil).memory_info().rss)
        except Exception:  # noqa: BLE001 - fall through to the OS readers
            log.debug("psutil cannot read this process's memory", exc_info=True)
    if sys.platform.startswith("linux"):
        return _rss_from_statm()
    if sys.platform == "win32":
        return _rss_windows()
    return None


def _rss_from_statm() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _rss_windows() -> int | None:
    try:
        import ctypes
        from ctypes import wintypes

        class PROCESS_MEMORY_COUNTERS(ctypes.Structure):  # the Win32 name
            _fields_ = [
                ("cb", wintypes.DWORD),
                ("PageFaultCount", wintypes.DWORD),
                ("PeakWorkingSetSize", ctypes.c_size_t),
                ("WorkingSetSize", ctypes.c_size_t),
                ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                ("PagefileUsage", ctypes.c_size_t),
                ("PeakPagefileUsage", ctypes.c_size_t),
            ]

        counters = PROCESS_MEMORY_COUNTERS()
        counters.cb = ctypes.sizeof(counters)
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        get_info = kernel32.K32GetProcessMemoryInfo  # kernel32 exports it since Windows 7
        get_info.argtypes = [wintypes.HANDLE, ctypes.POINTER(PROCESS_MEMORY_COUNTERS), wintypes.DWORD]
        get_info.restype = wintypes.BOOL
        if not get_info(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            return None
        return int(counters.WorkingSetSize)
    except (OSError, AttributeError, ValueError):
        return None


def memory_snapshot(device: Any = None, *, reset_cuda_peak: bool = False) -> dict[str, int | None]:
    """The memory fields of a step record, in bytes.

    cuda_allocated_bytes / cuda_reserved_bytes / cuda_peak_bytes are torch.cuda.memory_allocated,
    memory_reserved and max_memory_allocated for `device` (default: the current CUDA device); all
    three are None when CUDA is unavailable. The peak is since the process started or since the last
    torch.cuda.reset_peak_memory_stats; `reset_cuda_peak=True` resets it after reading, which makes
    the next snapshot's peak the peak of the interval in between.
    process_rss_bytes is the process's current resident set (None if the OS could not tell).
    """
    snapshot: dict[str, int | None] = dict.fromkeys(MEMORY_FIELDS)
    torch = sys.modules.get("torch")  # without torch loaded there is no CUDA memory to report
    if torch is not None and torch.cuda.is_available():
        if device is not None and torch.device(device).type != "cuda":
            device = None
        snapshot["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        snapshot["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        snapshot["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        if reset_cuda_peak:
            torch.cuda.reset_peak_memory_stats(device)
    snapshot["process_rss_bytes"] = process_rss_bytes()
    return snapshot


# The memory of the other processes of a multi-process run, in the main process's records as
# `<field>_rank<r>` (the window draws a line per GPU and process).
PER_PROCESS_FIELDS = ("cuda_allocated_bytes", "process_rss_bytes")


def other_processes_memory(accelerator: Any) -> dict[str, int]:
    """Every other process's GPU memory allocated and RAM: `cuda_allocated_bytes_rank1`, ...; a
    collective (every process calls it, one small all-gather); fields a process cannot tell are left out."""
    import torch

    snapshot = memory_snapshot(accelerator.device)
    mine = torch.tensor([-1 if snapshot[f] is None else snapshot[f] for f in PER_PROCESS_FIELDS],
                        dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine).view(-1, len(PER_PROCESS_FIELDS)).tolist()
    return {f"{field}_rank{rank}": int(value) for rank, row in enumerate(every) if rank > 0
            for field, value in zip(PER_PROCESS_FIELDS, row) if value >= 0}
