"""The training engine on its own thread: core's Trainer run in a QThread, its callbacks re-emitted
as Qt signals, the window's requests passed through core's TrainerCommands.

Nothing of the engine runs on the GUI thread: the Trainer is imported, built and run inside
TrainThread.run, and every callback only emits a signal, which Qt queues to the receivers' (GUI)
thread. The engine (and torch) are imported there too, so the window opens before torch loads.
EngineWarmUp imports them ahead of the first Start, while the user reads the settings.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal

from core.errors import ConfigError, UserError
from core.log_setup import FILE_ONLY
from core.train.events import TrainerCallbacks, TrainerCommands

log = logging.getLogger(__name__)
engine_log = logging.getLogger("core.train")
ENGINE_MODULES = ("accelerate", "diffusers", "peft", "core.train.trainer")
_import_lock = threading.Lock()
DOWNLOAD_REPORT_S = 0.2  # at most five download reports a second reach the window


def import_engine() -> None:
    """Import the engine and its libraries (any thread; once). Done so that the GUI thread, which
    shares the GIL with this one, is not frozen for long:

    - torch's main library (400 MB) is loaded with the GIL released first (a ctypes call to
      dlopen), instead of inside `import torch`, which holds the GIL for about a second meanwhile;
    - the garbage collector is off during the imports: they create millions of objects that would
      be scanned again and again by full collections, each a 0.2-0.5 s pause for every thread;
    - gc.freeze() then moves what was imported out of the collector's sight for good.
    """
    with _import_lock:
        if all(name in sys.modules for name in ENGINE_MODULES):
            return
        _preload_torch_library()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for name in ENGINE_MODULES:
                __import__(name)
        finally:
            gc.freeze()
            if was_enabled:
                gc.enable()


def _preload_torch_library() -> None:
    if os.name != "posix":
        return
    # Here, on the engine's thread: ctypes and importlib.util cost the window's first paint 5 ms.
    import ctypes
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.origin is None:
            return
        library = Path(spec.origin).parent / "lib" / "libtorch_python.so"
        if not library.is_file():
            return
        libc = ctypes.CDLL(None)
        libc.dlopen.restype = ctypes.c_void_p
        libc.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
        # A call through ctypes releases the GIL; RTLD_LOCAL adds nothing to the global symbols, so
        # torch's own import finds the library loaded and goes on exactly as without this.
        libc.dlopen(os.fsencode(library), os.RTLD_NOW | os.RTLD_LOCAL)
    except (OSError, AttributeError, ValueError):  # an optimisation only: torch's import loads it anyway
        log.debug("torch's library was not preloaded", exc_info=True)


@dataclass(frozen=True)
class RunError:
    """Why a run failed: one line for the user; for a bug also the traceback (details)."""

    message: str
    details: str = ""
    bug: bool = False
    keys: tuple[str, ...] = ()  # the settings a ConfigError names


@dataclass
class RunOutcome:
    """How a run ended, as the window shows it."""

    steps: int = 0
    total_steps: int = 0
    stopped_early: bool = False
    output_paths: list[str] = field(default_factory=list)
    final_loss: float | None = None
    skipped_steps: int = 0
    error: RunError | None = None


def several_processes(config: dict[str, Any]) -> bool:
    """Whether Start runs the engine as child processes (gui/launched_run.py): distributed.processes > 1."""
    return int((config.get("distributed") or {}).get("processes") or 0) > 1


class _Relay(TrainerCallbacks):
    """The engine's callbacks: each one records its thread and emits a signal, nothing more,
    because the engine waits for it and its time counts into the step."""

    def __init__(self, thread: TrainThread) -> None:
        self.thread = thread
        self.engine_error: str | None = None

    def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float | None) -> None:
        self.thread.record_call("on_progress")
        self.thread.progress.emit(step, total_steps, epoch, eta_seconds)

    def on_metrics(self, record: dict[str, Any]) -> None:
        self.thread.record_call("on_metrics")
        self.thread.metrics.emit(record)  # the engine does not reuse the dict (core.train.events)

    def on_log(self, level: int, message: str) -> None:
        self.thread.record_call("on_log")
        engine_log.log(level, "%s", message)  # the log file, written from this thread
        self.thread.log_line.emit(level, message)

    def on_sample(self, path: Path) -> None:
        self.thread.record_call("on_sample")
        self.thread.sample.emit(str(path))

    def on_sampling(self, step: int, done: int, count: int) -> None:
        self.thread.record_call("on_sampling")
        self.thread.sampling.emit(step, done, count)

    def on_done(self, output_paths: Sequence[Path]) -> None:
        self.thread.record_call("on_done")
        self.thread.done.emit([str(p) for p in output_paths])

    def on_error(self, message: str) -> None:
        self.thread.record_call("on_error")
        self.engine_error = message
        self.thread.log_line.emit(logging.ERROR, message)


class TrainThread(QThread):
    """One training run. Signals are emitted on this thread and, connected to GUI objects, arrive
    queued on the GUI thread. `outcome` is the last signal before `finished`."""

    progress = Signal(int, int, int, object)  # step, total steps, epoch (0-based), ETA seconds or None
    metrics = Signal(object)  # the step's record (the fields of metrics.jsonl)
    log_line = Signal(int, str)  # logging level, message
    sample = Signal(str)  # path of a sample written
    sampling = Signal(int, int, int)  # step, samples made, samples in all (done == all: training goes on)
    done = Signal(object)  # list[str]: the files written (on_done)
    device = Signal(object)  # core.train.run_info.device_info(): GPUs and their memory
    vram_estimate = Signal(object)  # bytes: core.memory's estimate of the step's peak (CUDA runs only)
    outcome = Signal(object)  # RunOutcome
    download = Signal(str, object, object)  # base model (hub id), bytes done, bytes in all (None: not known yet)

    def __init__(self, config: dict[str, Any], parent: QObject | None = None, *, resume: bool = False) -> None:
        super().__init__(parent)
        self.config = copy.deepcopy(config)  # later edits in the window do not reach the run
        self.resume = resume  # continue from the newest backup in the workspace
        self.commands = TrainerCommands()
        # Thread id of every kind of engine call ("Trainer.run", "on_progress", ...): the tests check
        # that none ran on the GUI thread. A set per name keeps this small on long runs.
        self.engine_calls: dict[str, set[int]] = {}
        self._calls_lock = threading.Lock()

    def record_call(self, name: str) -> None:
        with self._calls_lock:
            self.engine_calls.setdefault(name, set()).add(threading.get_ident())

    # Requests from the window (any thread): seen by the engine between steps.
    def request_stop(self) -> None:
        self.commands.request_stop()

    def request_sample(self, request: Any = None) -> None:
        """Samples of the configured prompts; with a core SampleRequest, that one sample (queued)."""
        self.commands.request_sample(request)

    def request_backup(self) -> None:
        self.commands.request_backup()

    def run(self) -> None:
        outcome = RunOutcome()
        relay = _Relay(self)
        try:
            self._download_model()
            self.record_call("import")
            import_engine()  # torch, diffusers: here, never on the GUI thread
            from core.train.trainer import Trainer

            self._report_device()
            self.record_call("Trainer")
            trainer = Trainer(self.config, relay, self.commands, resume=self.resume)
            self.record_call("Trainer.run")
            result = trainer.run()
        except UserError as e:
            # The user's to fix: one line, no traceback (as the CLI prints it).
            log.warning("training stopped: %s", e)
            keys = e.keys if isinstance(e, ConfigError) else ()
            outcome.error = RunError(str(e), keys=keys)
        except Exception as e:  # the boundary of the thread: a bug, logged in full
            log.exception("training failed unexpectedly", extra=FILE_ONLY)
            first_line = (str(e).strip().splitlines() or [""])[0]
            outcome.error = RunError(f"{type(e).__name__}: {first_line}".rstrip(": "), traceback.format_exc(), bug=True)
        else:
            outcome.steps, outcome.total_steps = result.steps, result.total_steps
            outcome.stopped_early, outcome.final_loss = result.stopped_early, result.final_loss
            outcome.skipped_steps = result.skipped_steps
            outcome.output_paths = [str(p) for p in result.output_paths]
            if relay.engine_error is not None:  # reported through on_error without raising
                outcome.error = RunError(relay.engine_error)
        unmade = self.commands.take_asked_samples()  # asked after the run's last step: say so, not nothing
        if unmade:
            self.log_line.emit(logging.WARNING, f"{len(unmade)} sample(s) asked from the sample window were not made: the run "
                                                "ended first; make them again now (Tools > Sample), from the saved weights")
        self.outcome.emit(outcome)

    def _download_model(self) -> None:
        """A base model given as a hub id and not in the local cache is downloaded first, its bytes
        reported (`download`) for the progress bar; the run then finds it in the cache. Offline
        (HF_HUB_OFFLINE) nothing is tried here: the run refuses it with its one-line reason."""
        from core.model_folder import hub_download_needed, resolve_model_folder

        name = str(self.config.get("base_model") or "").strip()
        if not hub_download_needed(name):
            return
        self.record_call("download")
        self.download.emit(name, 0, None)
        last = [0.0]

        def report(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] >= DOWNLOAD_REPORT_S or (total and done >= total):
                last[0] = now
                self.download.emit(name, done, total)

        folder = resolve_model_folder(name, progress=report)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        self.download.emit(name, size, size)  # done: the bar gives way to loading
        log.info("downloaded %s into %s", name, folder)

    def _report_device(self) -> None:
        # The GPU's capacity and the estimated peak for the memory plot's lines; torch is loaded
        # by now, and the estimate reads only config files, so both are cheap. A line is not worth
        # failing a run for: any error is logged and the line left out.
        try:
            from core.train.run_info import device_info

            info = device_info()
            self.device.emit(info)
            if not info.get("cuda_available"):
                return  # no GPU curves to compare an estimate with
            from core.memory.estimate import estimate_memory

            self.vram_estimate.emit(int(estimate_memory(self.config).peak_bytes))
        except Exception:
            log.warning("the memory plot's lines are left out", exc_info=True, extra=FILE_ONLY)


class EngineWarmUp(QThread):
    """Imports the engine (torch, diffusers, peft, accelerate) in the background, so the first
    Start does not wait for it. `ready(error)` with None when done, else the one-line reason."""

    ready = Signal(object)

    def run(self) -> None:
        try:
            import_engine()
        except Exception as e:  # reported again, with its reason, when a run starts
            log.warning("the training engine could not be loaded: %s", e, exc_info=True, extra=FILE_ONLY)
            self.ready.emit(f"{type(e).__name__}: {e}")
            return
        self.ready.emit(None)
