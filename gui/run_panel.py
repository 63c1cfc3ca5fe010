"""The run panel: Start / Stop, Sample now, Backup now, progress, status, the engine's log, the output.

The panel owns the run's TrainThread (gui.train_worker) and shows what it reports; the plots get the
metrics through `metrics_arrived`, so the panel knows nothing of them. It never calls the engine
itself: Start resolves the settings (core.config, no torch) and hands them to the thread; Stop,
Sample now and Backup now only set core's TrainerCommands flags, which the engine polls between steps.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from core.config.settings import resolve
from core.errors import ConfigError

from .config_state import Problem, messages
from .labels import wrapped_tooltip
from .run_messages import (
    RunProgress,
    download_text,
    error_box,
    format_duration,
    history_bar_text,
    outcome_text,
    output_links,
    sampling_text,
)
from .train_worker import EngineWarmUp, RunError, RunOutcome, TrainThread, several_processes

if TYPE_CHECKING:
    from core.train.run_history import RunHistory

log = logging.getLogger(__name__)

LOG_LINES = 5000  # the log view keeps the last lines only: a long run must not grow it without end
DETAIL_LINES = 30  # log lines put behind "Show Details" of an error


class RunPanel(QWidget):
    run_started = Signal(object)  # the run's resolved settings
    metrics_arrived = Signal(object)  # a step's record, on the GUI thread
    total_steps_known = Signal(int)  # the run's planned steps, at its first step (and if it changes)
    device_found = Signal(object)  # core.train.run_info.device_info() of the run's machine
    vram_estimate_known = Signal(object)  # bytes: the estimated peak of a CUDA run's step
    run_finished = Signal(object)  # RunOutcome, after the thread has ended
    engine_ready = Signal()  # the background import of the engine (warm_up) has ended

    def __init__(
        self,
        config: Callable[[], dict[str, Any]],
        problems: Callable[[], list[Problem]],
        parent: QWidget | None = None,
    ) -> None:
        """config: the settings to train with; problems: what blocks Start (MainWindow.invalid_settings)."""
        super().__init__(parent)
        self._config, self._problems = config, problems
        self._thread: TrainThread | None = None
        self.last_thread: TrainThread | None = None  # the previous run's, for its engine_calls
        self._warm_up: EngineWarmUp | None = None
        self._outcome: RunOutcome | None = None
        self._stopping = False
        self._warm_up_started = 0.0
        self._shut_down = False
        self._recent: deque[str] = deque(maxlen=DETAIL_LINES)
        self._restored: str | None = None  # the status the workspace's files tell (show_history)
        self._last_progress: tuple[int, int, int, float | None] | None = None
        self.error_box: QMessageBox | None = None

        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("Start training with these settings (Ctrl+Return)")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step and save what was trained (Ctrl+.)")
        self.stop_button.clicked.connect(self.stop)
        self.continue_button = QPushButton("Continue")
        self.continue_button.setToolTip(wrapped_tooltip(
            "Continue from the newest backup in the workspace folder (made with these settings); "
            "raise max_steps first to train a finished run further"))
        self.continue_button.clicked.connect(self.resume)
        self.sample_button = QPushButton("Sample now")
        self.sample_button.setToolTip("Make a sample after the current step")
        self.sample_button.clicked.connect(lambda: self.request_sample())
        self.backup_button = QPushButton("Backup now")
        self.backup_button.setToolTip("Write a backup (to resume from) after the current step")
        self.backup_button.clicked.connect(self.request_backup)
        buttons = QHBoxLayout()
        for button in (self.start_button, self.continue_button, self.stop_button, self.sample_button, self.backup_button):
            buttons.addWidget(button)
        buttons.addStretch(1)

        self.progress = RunProgress()
        self.status_label = QLabel()
        self.status_label.setObjectName("runStatus")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.output_label = QLabel()
        self.output_label.setObjectName("runOutput")
        self.output_label.setWordWrap(True)
        self.output_label.setOpenExternalLinks(True)
        self.output_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        self.output_label.hide()
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(LOG_LINES)
        self.log_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        self.log_view.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.log_view.setPlaceholderText("The engine's messages appear here during a run.")

        column = QVBoxLayout(self)
        column.setContentsMargins(10, 6, 6, 6)
        column.addLayout(buttons)
        column.addWidget(self.progress)
        column.addWidget(self.status_label)
        column.addWidget(self.output_label)
        column.addWidget(self.log_view, 1)
        self._update_controls()

    # -- what the window uses --------------------------------------------------------------------

    def is_running(self) -> bool:
        return self._thread is not None

    def is_busy(self) -> bool:
        """A run or the engine's background import is under way (shutdown() would wait)."""
        return self._thread is not None or (self._warm_up is not None and self._warm_up.isRunning())

    def is_stopping(self) -> bool:
        return self._thread is not None and self._stopping

    @property
    def thread(self) -> TrainThread | None:
        """The running run's thread (None when idle)."""
        return self._thread

    def set_problems(self, problems: list[Problem]) -> None:
        """The settings changed: Start is blocked, with the first reason shown, while any is wrong."""
        self._update_controls(problems)

    def resume(self) -> bool:
        """Continue from the newest backup in the workspace (the engine refuses one made with other
        settings, with the reason); False if it cannot start."""
        return self.start(resume=True)

    def start(self, resume: bool = False) -> bool:
        """Start a run with the window's settings; False (and the reason shown) if it cannot start."""
        if self._thread is not None:
            return False
        problems = self._problems()
        if problems:
            self._update_controls(problems)
            QMessageBox.warning(
                self, "Start training", "Training cannot start until these settings are fixed:\n\n" + "\n".join(messages(problems))
            )
            return False
        try:
            # As 'main.py train' does: defaults, then these settings, checked across settings.
            config = resolve(self._config())
        except ConfigError as e:
            self._show_error(RunError(str(e), keys=e.keys), "Training cannot start")
            return False

        if several_processes(config):  # distributed.processes > 1: child processes under accelerate launch
            from .launched_run import LaunchedTrainThread

            thread: TrainThread = LaunchedTrainThread(config, resume=resume)
        else:
            thread = TrainThread(config, resume=resume)
        queued = Qt.ConnectionType.QueuedConnection  # explicit: every slot runs on the GUI thread
        thread.progress.connect(self._on_progress, queued)
        thread.metrics.connect(self._on_metrics, queued)
        thread.log_line.connect(self._on_log, queued)
        thread.sample.connect(self._on_sample, queued)
        thread.sampling.connect(self._on_sampling, queued)
        thread.done.connect(self._on_done, queued)
        thread.download.connect(self._on_download, queued)
        thread.device.connect(self._on_device, queued)
        thread.vram_estimate.connect(self.vram_estimate_known, queued)
        thread.outcome.connect(self._on_outcome, queued)
        thread.finished.connect(self._on_finished, queued)
        self._thread, self._outcome, self._stopping = thread, None, False
        self._restored, self._last_progress = None, None
        self.last_thread = None
        self._recent.clear()
        self.log_view.clear()
        self.output_label.hide()
        self.progress.show_state(0, 0, "preparing")  # busy until the first step: loading, caching
        loading = "loading the engine, " if "core.train.trainer" not in sys.modules else ""
        self._set_status(f"Starting: {loading}loading the model and caching the data...")
        how = "continued from the newest backup" if resume else "started"
        self._append(logging.INFO, f"Training {how} ({config['model_type']}, {config['training_method']}).")
        self._update_controls()
        self.run_started.emit(config)
        thread.start()
        return True

    def stop(self) -> None:
        """Ask the run to stop after the current step; it saves what it has and ends."""
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        self._thread.request_stop()
        self._set_status("Stopping after the current step; the result is saved first...")
        self._append(logging.INFO, "Stop requested.")
        self._update_controls()

    def request_sample(self, request: Any = None) -> bool:
        """Ask the run for samples after the current step: the configured prompts, or with a core
        SampleRequest (the sample window) that one; False when no run is under way."""
        if self._thread is None:
            return False
        self._thread.request_sample(request)
        what = "Sample" if request is None else f"Sample of {request.prompt!r} (seed {request.seed})"
        self._append(logging.INFO, f"{what} requested: made after the current step.")
        return True

    def request_backup(self) -> None:
        if self._thread is not None:
            self._thread.request_backup()
            self._append(logging.INFO, "Backup requested: written after the current step.")

    def warm_up(self) -> bool:
        """Load the engine (torch, ...) in the background so the first Start does not wait for it;
        False if there is nothing to do (loaded, loading, or a run has started)."""
        if self._shut_down or self._warm_up is not None or self._thread is not None or "core.train.trainer" in sys.modules:
            return False
        self._warm_up = EngineWarmUp()
        self._warm_up.ready.connect(self._on_warmed_up, Qt.ConnectionType.QueuedConnection)
        self._warm_up.finished.connect(self._on_warm_up_finished, Qt.ConnectionType.QueuedConnection)
        self._warm_up_started = time.perf_counter()
        self._set_status("Loading the training engine in the background...")
        self._warm_up.start()
        return True

    def shutdown(self) -> None:
        """Before the window goes: end our threads (a QThread must not outlive its object)."""
        self._shut_down = True  # a warm-up timer firing later must not start a thread
        if self._thread is not None:
            self._thread.request_stop()
            self._thread.wait()
        if self._warm_up is not None:
            self._warm_up.wait()  # an import cannot be interrupted; it ends by itself

    # -- the run's signals (GUI thread) ----------------------------------------------------------

    def show_history(self, history: RunHistory) -> None:
        """Between runs: the progress and status of the workspace's run as its files tell it (after
        a relaunch, or when workspace_dir changes)."""
        if self._thread is not None:
            return
        self._restored, self._outcome = history.status(), None
        total = history.total_steps if history.records and history.total_steps else 0
        self.progress.show_state(min(history.steps, total), total or 1, history_bar_text(history) if total else "not started")
        self._set_status(self._restored or "Ready.")
        self._update_controls()

    def _on_progress(self, step: int, total: int, epoch: int, eta: float | None) -> None:
        self._last_progress = (step, total, epoch, eta)
        if self.progress.maximum() != total:
            self.progress.setRange(0, total)
            self.total_steps_known.emit(total)
        self.progress.setValue(step)
        self.progress.setFormat(f"step {step} / {total}  ·  epoch {epoch + 1}  ·  {format_duration(eta)} left")

    def _on_metrics(self, record: dict[str, Any]) -> None:
        if not self._stopping:
            loss, seconds = record.get("loss_smoothed"), record.get("seconds_per_step")
            parts = [f"loss {loss:.4f} (smoothed)" if isinstance(loss, float) else "",
                     f"{seconds:.2f} s/step" if isinstance(seconds, float) else ""]
            self._set_status("Training: " + ", ".join(p for p in parts if p) + ".")
        self.metrics_arrived.emit(record)

    def _on_log(self, level: int, message: str) -> None:
        self._append(level, message)

    def _on_sampling(self, step: int, done: int, count: int) -> None:
        """Samples are being made (training waits): their own progress on the bar until the last."""
        if done >= count:
            if self._last_progress is not None:
                self._on_progress(*self._last_progress)
            if not self._stopping:
                self._set_status("Training: samples made, training goes on...")
            return
        bar, status = sampling_text(step, done, count)
        self.progress.show_state(done, count, bar)
        if not self._stopping:
            self._set_status(status)

    def _on_sample(self, path: str) -> None:
        self._append(logging.INFO, f"Sample written: {path}")

    def _on_done(self, paths: list[str]) -> None:
        for path in paths:
            self._append(logging.INFO, f"Saved {path}")

    def _on_download(self, name: str, done: int, total: int | None) -> None:
        """The base model (a hub id) downloads before the run loads it: its bytes on the bar."""
        if total and done >= total:  # downloaded: loading and caching follow
            self.progress.show_state(0, 0, "preparing")
            self._append(logging.INFO, f"Downloaded {name}.")
            self._set_status("Starting: loading the model and caching the data...")
            return
        if done == 0 and not total:
            self._append(logging.INFO, f"Downloading {name} from the Hugging Face hub (once; later runs use the copy).")
        bar, status = download_text(name, done, total)
        self.progress.show_download(done, total, bar)
        self._set_status(status)

    def _on_device(self, info: dict[str, Any]) -> None:
        self.device_found.emit(info)

    def _on_outcome(self, outcome: RunOutcome) -> None:
        self._outcome = outcome

    def _on_finished(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.wait()  # 'finished' is sent just before the thread really ends
        self.last_thread = thread
        outcome = self._outcome or RunOutcome(error=RunError("the training thread ended without a result", bug=True))
        self._stopping = False
        self._show_outcome(outcome)
        self._update_controls()
        self.run_finished.emit(outcome)
        if outcome.error is not None:
            self._show_error(outcome.error, "Training stopped")

    def _on_warmed_up(self, error: str | None) -> None:
        seconds = time.perf_counter() - self._warm_up_started
        if error:
            self._append(logging.WARNING, f"The training engine could not be loaded: {error}")
        else:
            log.info("training engine loaded in %.1f s", seconds)

    def _on_warm_up_finished(self) -> None:
        if self._warm_up is not None:
            self._warm_up.wait()
            self._warm_up = None
        if self._thread is None:
            self._update_controls()
        self.engine_ready.emit()

    # -- showing ---------------------------------------------------------------------------------

    def _show_outcome(self, outcome: RunOutcome) -> None:
        bar, status = outcome_text(outcome)
        self.progress.show_state(outcome.steps if outcome.total_steps else 0, outcome.total_steps or 1, bar)
        self._set_status(status)
        self._append(logging.INFO, self.status_label.text())
        if outcome.output_paths:
            links = output_links(outcome.output_paths)
            self.output_label.setText(f"Saved: {links}")
            self.output_label.setToolTip("Click to open the folder")
            self.output_label.show()

    def _show_error(self, error: RunError, title: str) -> None:
        """The one-line reason, with details behind "Show Details"; not modal to the app's loop."""
        box = error_box(self, error, title, list(self._recent))
        self.error_box = box
        box.finished.connect(self._error_box_closed)
        box.open()  # window-modal without a nested event loop: the run's last signals keep flowing

    def _error_box_closed(self) -> None:
        self.error_box = None

    def _has_backup(self) -> bool:
        """Whether the workspace of the window's settings holds a backup to continue from."""
        from core.train.backup import BackupFolder  # standard library only: no torch on the GUI thread

        # The setting as it is, not resolve()d: this runs at every change of the controls (four times
        # before the first paint), and a workspace_dir that does not validate holds no backup anyway.
        workspace = str(self._config().get("workspace_dir") or "").strip()
        try:
            return bool(workspace) and BackupFolder(workspace).newest() is not None
        except (OSError, TypeError, ValueError):
            return False

    def _append(self, level: int, message: str) -> None:
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}.get(level, "")
        line = f"{time.strftime('%H:%M:%S')}  {prefix}{message}"
        self._recent.append(line)
        self.log_view.appendPlainText(line)

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _update_controls(self, problems: list[Problem] | None = None) -> None:
        running = self._thread is not None
        self.stop_button.setEnabled(running and not self._stopping)
        self.sample_button.setEnabled(running and not self._stopping)
        self.backup_button.setEnabled(running and not self._stopping)
        if running:
            self.start_button.setEnabled(False)
            self.continue_button.setEnabled(False)
            return
        problems = self._problems() if problems is None else problems
        self.start_button.setEnabled(not problems)
        self.continue_button.setEnabled(not problems and self._has_backup())
        if problems:
            lines = messages(problems)
            more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
            self.start_button.setToolTip(wrapped_tooltip("Fix the settings first:\n" + "\n".join(lines)))
            self._set_status(f"Fix the settings first: {lines[0]}{more}")
            return
        self.start_button.setToolTip("Start training with these settings (Ctrl+Return)")
        if self._warm_up is not None and self._warm_up.isRunning():
            self._set_status("Loading the training engine in the background...")
        elif self._outcome is None or not self.status_label.text() or self.status_label.text().startswith("Fix the settings"):
            self._set_status(self._restored or "Ready.")
