"""What the training engine tells its client, and what the client asks of it: no Qt here.

The engine takes a `TrainerCallbacks` (the client overrides the methods it cares about) and a
`TrainerCommands` (flags the client sets from any thread; the engine polls them between optimizer
steps). The CLI implements the callbacks by printing and logging; the window will implement them in a
QThread worker that re-emits each call as a Qt signal.

Threading contract:
- Every callback runs on the training thread, synchronously, between optimizer steps. A GUI must
  marshal to its own thread (emit a queued signal) and must not touch widgets from a callback.
- Callbacks should return quickly: the engine waits for them, and time spent in them counts into
  seconds_per_step. Arguments passed to a callback are not reused by the engine afterwards (the
  client may keep them).
- `TrainerCommands` methods are safe to call from any thread. A request is seen at the engine's
  next poll (after the current optimizer step), never in the middle of a step.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.models.base import SampleRequest


class TrainerCallbacks:
    """Notifications from the engine. Every method is a no-op; override the ones you need.

    All methods are called on the training thread (see the module docstring).
    """

    def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float | None) -> None:
        """After each optimizer step: steps done so far (1-based), the planned total, the current
        epoch (0-based), and the estimated seconds left (None while there is no estimate yet)."""

    def on_metrics(self, record: dict[str, Any]) -> None:
        """After each optimizer step: the record also written to metrics.jsonl (see core.train.telemetry)."""

    def on_log(self, level: int, message: str) -> None:
        """A line for the user: `level` is a `logging` level (logging.INFO, logging.WARNING, ...)."""

    def on_sample(self, path: Path) -> None:
        """A sample (video or image) was written to `path`."""

    def on_sampling(self, step: int, done: int, count: int) -> None:
        """Samples are being made after `step`: `done` of `count` are made (before each one, and once
        with done == count when they all are); training waits meanwhile."""

    def on_done(self, output_paths: Sequence[Path]) -> None:
        """Training finished (or stopped on request) and wrote these outputs (LoRA, checkpoint, ...)."""

    def on_error(self, message: str) -> None:
        """Training failed; `message` is one line for the user (details are in the log file)."""


class TrainerCommands:
    """Requests from the client to the engine: thread-safe flags the engine polls between steps.

    `request_stop()` is sticky: once set, `stop_requested` stays True. Sample and backup requests are
    one-shot: `take_sample_request()` / `take_backup_request()` return True once per request (several
    requests before a poll count as one) and reset the flag. A sample asked with its own parameters
    (`request_sample(SampleRequest)`, the window's sample window) is queued instead: each one is made,
    in order, with its prompt, seed, size, frames and steps in place of the sampling settings;
    `take_asked_samples()` hands them over and empties the queue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sample = False
        self._asked: list[SampleRequest] = []
        self._backup = False

    # Client side (any thread).
    def request_stop(self) -> None:
        """Ask the engine to stop after the current step, save what it has, and call on_done."""
        self._stop.set()

    def request_sample(self, request: SampleRequest | None = None) -> None:
        """Ask for samples of the configured prompts at the next poll; with a `request`, queue that
        one sample instead (made at the next poll, whatever the sampling settings say)."""
        with self._lock:
            if request is None:
                self._sample = True
            else:
                self._asked.append(request)

    def request_backup(self) -> None:
        """Ask for a backup (a resumable checkpoint) at the next poll."""
        with self._lock:
            self._backup = True

    # Engine side (the training thread).
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Block up to `timeout` seconds for a stop request (for waits outside the step loop)."""
        return self._stop.wait(timeout)

    def take_sample_request(self) -> bool:
        """True once if a sample was requested since the last call; resets the request."""
        with self._lock:
            requested, self._sample = self._sample, False
        return requested

    def take_asked_samples(self) -> list[SampleRequest]:
        """The samples queued with their own parameters since the last call, oldest first; empties the queue."""
        with self._lock:
            asked, self._asked = self._asked, []
        return asked

    def take_backup_request(self) -> bool:
        """True once if a backup was requested since the last call; resets the request."""
        with self._lock:
            requested, self._backup = self._backup, False
        return requested


class FolderCommands(TrainerCommands):
    """Requests from a client in another process (the window running the engine under accelerate
    launch): it creates the files `stop`, `sample` or `backup` in `folder`; the engine sees them
    between steps, as if asked in-process. Only the main process reads the folder (the loop shares
    every request with the others, core/train/loop.py), and it removes a sample or backup file when
    it takes the request; `stop` stays."""

    STOP, SAMPLE, BACKUP = "stop", "sample", "backup"

    def __init__(self, folder: str | os.PathLike, *, main: bool) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.main = main

    def _file_asked(self, name: str, *, take: bool) -> bool:
        if not self.main:
            return False
        path = self.folder / name
        if not path.exists():
            return False
        if take:
            path.unlink(missing_ok=True)
        return True

    @property
    def stop_requested(self) -> bool:
        if self._file_asked(self.STOP, take=False):
            self.request_stop()
        return super().stop_requested

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stop_requested:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def take_sample_request(self) -> bool:
        return self._file_asked(self.SAMPLE, take=True) | super().take_sample_request()

    def take_backup_request(self) -> bool:
        return self._file_asked(self.BACKUP, take=True) | super().take_backup_request()
