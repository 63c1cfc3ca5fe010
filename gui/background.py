"""Work that follows the settings, done off the GUI thread: debounced, and the latest request wins.

The side panels (the dataset doctor, the VRAM estimate, the sample player) recompute something
whenever the settings change. Doing it on the GUI thread would freeze the window (the doctor probes
every file with PyAV), and doing it on every keystroke would waste the machine. BackgroundJob waits
until the edits pause (`delay_ms`), runs the function on a QThread, and reports only the result of
the newest request: a request made while a run is under way cancels that run (the function sees it
at its next `control.check()`) and starts again with the newer argument once it has ended.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QThread, QTimer, Signal

from core.errors import UserError
from core.log_setup import FILE_ONLY

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a job's function when a newer request has made its result useless."""


class JobControl:
    """What a job's function gets besides its argument: cancellation and progress (any thread)."""

    def __init__(self, report: Callable[[int, int], None] | None = None) -> None:
        self._cancelled = threading.Event()
        self._report = report

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise Cancelled if a newer request came; call it between slices of the work."""
        if self._cancelled.is_set():
            raise Cancelled

    def progress(self, done: int, total: int) -> None:
        """Report progress (and stop here if cancelled): a callback shaped for core's `progress`."""
        self.check()
        if self._report is not None:
            self._report(done, total)


class _Worker(QThread):
    progress = Signal(int, int)

    def __init__(self, fn: Callable[[Any, JobControl], Any], argument: Any, name: str) -> None:
        super().__init__()
        self.fn, self.argument, self.name = fn, argument, name
        self.control = JobControl(self.progress.emit)
        self.outcome: tuple[str, Any] = ("cancelled", None)

    def run(self) -> None:
        try:
            self.outcome = ("ok", self.fn(self.argument, self.control))
        except Cancelled:
            self.outcome = ("cancelled", None)
        except UserError as e:  # the user's to fix: one line, shown by the panel
            self.outcome = ("error", str(e))
        except Exception as e:  # a bug: logged in full, one line for the panel
            log.warning("%s failed", self.name, exc_info=True, extra=FILE_ONLY)
            first = (str(e).strip().splitlines() or [""])[0]
            self.outcome = ("error", f"{type(e).__name__}: {first}".rstrip(": "))


class BackgroundJob(QObject):
    """Runs fn(argument, control) on a worker thread for the newest request; signals on the GUI thread.

    `finished_ok(argument, result)` or `failed(argument, message)` for the newest request only;
    `busy(bool)` when work starts and when it has all ended; `progress(done, total)` from the function.
    """

    finished_ok = Signal(object, object)
    failed = Signal(object, str)
    busy = Signal(bool)
    progress = Signal(int, int)

    def __init__(self, fn: Callable[[Any, JobControl], Any], delay_ms: int, name: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._fn, self._name = fn, name
        self._worker: _Worker | None = None
        self._pending: tuple[Any] | None = None  # (argument,): None when nothing waits
        self._closed = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(delay_ms)
        self._timer.timeout.connect(self._launch)

    def request(self, argument: Any, *, now: bool = False) -> None:
        """Compute for this argument once the requests pause (at once with now=True)."""
        if self._closed:
            return
        self._pending = (argument,)
        if self._worker is not None:
            self._worker.control.cancel()  # its result would be stale anyway
        if not self.is_busy():
            self.busy.emit(True)
        self._timer.start(0 if now else self._timer.interval())

    def cancel(self) -> None:
        """Forget what waits and what runs: no result comes for either."""
        waiting = self._timer.isActive()
        self._timer.stop()
        self._pending = None
        if self._worker is not None:
            self._worker.control.cancel()  # busy(False) follows when it has ended
        elif waiting:
            self.busy.emit(False)

    def is_busy(self) -> bool:
        return self._timer.isActive() or self._worker is not None

    def wait(self, timeout_ms: int = 30_000) -> bool:
        """Run what is pending now and wait for all of it (tests, screenshots); False on timeout."""
        from PySide6.QtCore import QCoreApplication, QDeadlineTimer, QEventLoop

        deadline = QDeadlineTimer(timeout_ms)
        if self._timer.isActive():
            self._timer.stop()
            self._launch()
        while self.is_busy():
            if deadline.hasExpired():
                return False
            if self._worker is not None:
                self._worker.wait(50)
            QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            if self._timer.isActive():  # a request arrived while waiting: no need to debounce it
                self._timer.stop()
                self._launch()
        return True

    def shutdown(self) -> None:
        """Before the window goes: drop what waits, cancel what runs and wait for its thread to end."""
        self._closed = True
        self._timer.stop()
        self._pending = None
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.control.cancel()
            worker.wait()

    def _launch(self) -> None:
        if self._worker is not None or self._pending is None or self._closed:
            return  # the running one launches the pending one when it ends
        (argument,) = self._pending
        self._pending = None
        worker = _Worker(self._fn, argument, self._name)
        worker.progress.connect(self.progress)
        worker.finished.connect(self._worker_finished)  # queued: emitted on the worker's thread
        self._worker = worker
        worker.start()

    def _worker_finished(self) -> None:
        worker = self.sender()
        if worker is not self._worker or not isinstance(worker, _Worker):
            return  # shut down meanwhile
        worker.wait()
        self._worker = None
        kind, value = worker.outcome
        if worker.control.cancelled and kind != "cancelled":
            kind = "cancelled"  # cancelled after its last check: the result is not wanted
        if self._pending is not None:  # a newer request: this result is stale
            if not self._timer.isActive():
                self._launch()
            return
        if kind == "ok":
            self.finished_ok.emit(worker.argument, value)
        elif kind == "error":
            self.failed.emit(worker.argument, value)
        self.busy.emit(False)
