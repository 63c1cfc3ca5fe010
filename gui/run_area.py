"""Below the settings: the run panel beside the live plots, the panel's reports wired to the plots."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QSplitter, QWidget

from .config_state import Problem
from .plots import TrainingPlots
from .run_panel import RunPanel


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
        self.plots = TrainingPlots()
        self.panel.run_started.connect(self._run_started)
        self.panel.metrics_arrived.connect(self.plots.add_record)
        self.panel.total_steps_known.connect(self.plots.set_total_steps)
        self.panel.device_found.connect(self.plots.set_device)
        self.panel.vram_estimate_known.connect(self.plots.set_vram_estimate)
        self.addWidget(self.panel)
        self.addWidget(self.plots)
        self.setStretchFactor(1, 1)
        self.setSizes([420, 700])

    def _run_started(self, config: dict[str, Any]) -> None:
        self.plots.clear()
        if config["stop_after"] == "STEPS":
            # The planned length now, while the model loads, rather than with the first step, which
            # moves every other axis too: the engine's total (on_progress) corrects it if it differs.
            self.plots.set_total_steps(config["max_steps"])
