"""Data-loading worker processes end when the run that made them ends, however it ends.

A DataLoader worker left to itself outlives a killed training process: torch's own watchdog notices
the dead parent (it compares os.getppid() each time its task queue stays empty for 5 s) and leaves
its loop, but the process then exits through multiprocessing's finalizers, which join the thread
that feeds its result queue. That thread is blocked writing prefetched batches into the queue's
pipe, which nobody reads any more and which never breaks: every worker holds the pipe's read end
open itself (inherited from the fork). So the worker waits forever, holding its memory (about
400 MB each for the tiny model's run, far more for a real one).

`WorkerLifeline` is the loaders' worker_init_fn. In each worker it starts a daemon thread that
watches the process that made the loader and ends the worker with os._exit (no finalizers, no
join) once that process is gone; on Linux the kernel also sends the worker SIGKILL the moment the
thread that started it ends (PR_SET_PDEATHSIG). It draws nothing from any random generator, so
the workers' seeding (and with it resume's exactness) is unchanged. Workers ignore Ctrl+C, which is
the training process's to handle. Ends that leave the creating process alive (the window's Stop, an
exception) are the loader's own business: the trainer shuts the workers down in a finally
(core.data.dataset.BatchLoader.close).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

# How often the watch looks for the creating process: how long a worker can outlive a killed run.
WATCH_INTERVAL_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkerLifeline:
    """worker_init_fn that ties a worker's life to the process that made the loader (picklable, so
    it also reaches spawned workers on Windows and macOS)."""

    def __init__(self, creator_pid: int | None = None) -> None:
        self.creator_pid = os.getpid() if creator_pid is None else int(creator_pid)

    def __call__(self, worker_id: int) -> None:
        # Ctrl+C reaches the whole foreground process group. It is the training process's to handle
        # (the CLI stops after the step at the first, at once at the second) and then to end the
        # workers; a forked worker would otherwise run the CLI's handler too (its message printed
        # once per worker) or, at the second, leave its loop while the run still needs batches.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        watch_creator(self.creator_pid)


def watch_creator(creator_pid: int) -> None:
    """End this process (os._exit) as soon as process creator_pid is gone; returns at once."""
    if sys.platform == "win32":
        _watch_windows(creator_pid)
        return
    is_parent = os.getppid() == creator_pid
    if is_parent and sys.platform.startswith("linux"):
        _kill_me_with_my_parent_thread()
    if not _creator_alive(creator_pid, is_parent):  # gone before the watch began
        os._exit(0)
    threading.Thread(target=_watch_posix, args=(creator_pid, is_parent), name="worker-lifeline", daemon=True).start()


def _kill_me_with_my_parent_thread() -> None:
    # The signal follows the thread that forked this worker: the thread that iterates the loader,
    # i.e. the thread running the training loop (the main thread in the CLI, the engine's QThread in
    # the window). When it ends, the run has ended too.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # no prctl in this libc: the watch thread still does it
        logger.debug("no prctl here", exc_info=True)


def _creator_alive(creator_pid: int, is_parent: bool) -> bool:
    if is_parent:
        # An orphan is adopted by another process, so a changed parent means the creator is gone,
        # even if its pid has been reused since.
        return os.getppid() == creator_pid
    try:  # workers of a forkserver or spawn context whose parent is not the creator
        os.kill(creator_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user: not ours to outlive
        return True
    return True


def _watch_posix(creator_pid: int, is_parent: bool) -> None:
    while _creator_alive(creator_pid, is_parent):
        time.sleep(WATCH_INTERVAL_S)
    os._exit(0)


def _watch_windows(creator_pid: int) -> None:
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.WaitForSingleObject.argtypes = (wintypes.HANDLE, wintypes.DWORD)
    kernel32.WaitForSingleObject.restype = wintypes.DWORD
    synchronize, infinite = 0x00100000, 0xFFFFFFFF
    # A handle, unlike a pid, cannot come to mean another process once the creator has exited.
    handle = kernel32.OpenProcess(synchronize, False, creator_pid)
    if not handle:  # the creator is already gone
        os._exit(0)

    def wait() -> None:
        kernel32.WaitForSingleObject(handle, infinite)
        os._exit(0)

    threading.Thread(target=wait, name="worker-lifeline", daemon=True).start()
