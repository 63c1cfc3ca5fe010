"""Below the settings: the run panel beside the live plots, the panel's reports wired to the plots.

The plots (pyqtgraph, with numpy) are the heaviest import of the window, about half a second, so
they are not built with it: an empty placeholder holds their place until the window's first paint,
and they are built just after it (or as soon as anything asks for `plots`), which halved the time to
the window's first paint (docs/benchmarks.md, "Window: launch to first paint").

Between runs the plots and the panel's status show the run of the settings' workspace_dir, read
from its files on a worker thread (core.train.run_history): after a launch, and when workspace_dir
changes. Continue keeps the plotted steps; a fresh Start clears them (the engine sets the earlier
run's metrics aside).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QEvent, QObject, Qt, QTimer
from PySide6.QtWidgets import QSplitter, QWidget

from .background import BackgroundJob, JobControl
from .config_state import Problem
from .run_panel import RunPanel

if TYPE_CHECKING:
    from .plots import TrainingPlots

log = logging.getLogger(__name__)

WORKSPACE_PAUSE_MS = 300  # after the last edit of workspace_dir, its history is read


class RunArea(QSplitter):
    """RunPanel (left) and TrainingPlots (right), resizable; see docs/window.md."""

    def __init__(
        self,
        config: Callable[[], dict[str, Any]],
        problems: Callable[[], list[Problem]],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(Qt.Orientation.Horizontal, parent)
        self.panel = RunPanel(config, problems)
        self._plots: TrainingPlots | None = None
        self._placeholder = QWidget()  # where the plots go once built
        self._placeholder.installEventFilter(self)
        self._config = config
        self._shown: str | None = None  # the workspace whose history the plots and status show
        # Edits of workspace_dir arrive per keystroke: the history is read once they pause, on a
        # worker thread (a long run's metrics.jsonl takes most of a second to parse).
        self._history = BackgroundJob(_read_history, WORKSPACE_PAUSE_MS, "run history", self)
        self._history.finished_ok.connect(self._history_read)
        self.panel.run_finished.connect(lambda _outcome: self._remember_shown())
        self.panel.run_started.connect(self._run_started)
        self.panel.metrics_arrived.connect(lambda record: self.plots.add_record(record))
        self.panel.total_steps_known.connect(lambda total: self.plots.set_total_steps(total))
        self.panel.device_found.connect(lambda info: self.plots.set_device(info))
        self.panel.vram_estimate_known.connect(lambda value: self.plots.set_vram_estimate(value))
        self.addWidget(self.panel)
        self.addWidget(self._placeholder)
        self.setStretchFactor(1, 1)
        self.setSizes([420, 700])

    @property
    def plots(self) -> TrainingPlots:
        """The live plots, built now if they were not yet."""
        if self._plots is None:
            from .plots import TrainingPlots  # pyqtgraph and numpy: after the first paint

            sizes = self.sizes()
            self._plots = TrainingPlots()
            self.replaceWidget(1, self._plots)
            self._placeholder.removeEventFilter(self)
            self._placeholder.deleteLater()
            self.setSizes(sizes)
            log.debug("plots built")
            self.show_workspace()
        return self._plots

    def plots_built(self) -> bool:
        return self._plots is not None

    def build_plots(self) -> None:
        """Build the plots if they are not yet (after the first paint, for screenshots and tests)."""
        _ = self.plots

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if watched is self._placeholder and event.type() == QEvent.Type.Paint:
            self._placeholder.removeEventFilter(self)
            QTimer.singleShot(0, self.build_plots)  # once this paint is on the screen
        return False

    def settings_changed(self) -> None:
        """The settings changed (maybe workspace_dir): show that workspace's history once edits pause."""
        if self._plots is not None and not self.panel.is_running():
            self.show_workspace(now=False)

    def show_workspace(self, force: bool = False, *, now: bool = True) -> None:
        """Between runs: the plots and the run panel's status show the run in the settings'
        workspace_dir, from its files (metrics.jsonl, run_info.json, backups), read in the background."""
        if self._plots is None or self.panel.is_running():
            return
        workspace = self._workspace()
        if workspace is None or (workspace == self._shown and not force):
            return
        self._history.request(workspace, now=now)

    def settle(self, timeout_ms: int = 30_000) -> bool:
        """Wait until the workspace's history is shown (tests, screenshots)."""
        return self._history.wait(timeout_ms)

    def shutdown(self) -> None:
        self._history.shutdown()

    def _history_read(self, workspace: str, history: Any) -> None:
        if self.panel.is_running() or workspace != self._workspace() or self._plots is None:
            return  # a run started, or the settings moved on, meanwhile
        self._shown = workspace
        self._plots.clear()
        if history.total_steps:
            self._plots.set_total_steps(history.total_steps)
        self._plots.add_records(history.records)
        self.panel.show_history(history)

    def _workspace(self) -> str | None:
        from core.config.settings import resolve
        from core.errors import ConfigError

        try:
            return str(Path(resolve(self._config())["workspace_dir"]).expanduser())
        except (ConfigError, KeyError, TypeError, ValueError):
            return None

    def _remember_shown(self) -> None:
        self._shown = self._workspace()

    def _run_started(self, config: dict[str, Any]) -> None:
        self.plots.clear()
        self._history.cancel()
        workspace = str(Path(config["workspace_dir"]).expanduser())
        if self.panel.thread is not None and self.panel.thread.resume:
            # Continue: the run so far stays on the plots; steps the engine redoes after its backup
            # replace their points as they come (TrainingPlots.add_record).
            from core.train.run_history import read_history

            self.plots.add_records(read_history(workspace).records)
        self._shown = workspace
        if config["stop_after"] == "STEPS":
            # The planned length now, while the model loads, rather than with the first step, which
            # moves every other axis too: the engine's total (on_progress) corrects it if it differs.
            self.plots.set_total_steps(config["max_steps"])


def _read_history(workspace: str, _control: JobControl) -> Any:
    from core.train.run_history import read_history

    return read_history(workspace)
