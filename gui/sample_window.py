"""Tools > Sample: one sample with its own prompt, negative prompt, seed, size, frames and steps.

During a run the request is queued to the running trainer (TrainerCommands.request_sample with a
core SampleRequest): the engine makes it after the current step with the trained weights as they are,
and it arrives through the run's `sample` signal like every sample. Between runs it is made on a
worker thread by core/train/sample_now.py: the base model with the workspace's newest LoRA file or
backup, written into workspace_dir/samples. Either way the result plays in the Sampling tab's viewer
(gui/sample_viewer.py). The fields start from the sampling settings (first prompt, size, frames,
steps, seed) and keep what the user typed while the window lives; the guidance scale is the settings'.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Protocol

from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from core.config.settings import lookup
from core.models.base import SampleRequest

from .background import BackgroundJob, JobControl
from .side_panel import PROBLEM_COLOUR, muted_label, set_text_colour

log = logging.getLogger(__name__)

# The sample's numbers, each bounded as its sampling setting is (core/config/schema.py).
NUMBERS = (("seed", "Seed"), ("width", "Width"), ("height", "Height"), ("frames", "Frames"), ("inference_steps", "Steps"))


class SampleHost(Protocol):
    """What the window needs of the main window."""

    @property
    def config(self) -> dict[str, Any]: ...

    run_panel: Any  # gui.run_panel.RunPanel

    def show_sample(self, path: Path) -> None: ...


def _make(job: tuple[dict[str, Any], SampleRequest], control: JobControl) -> Any:
    from core.train.sample_now import make_sample

    from .train_worker import import_engine

    import_engine()  # torch and the rest as the trainer thread imports them (the GUI thread stays free)
    config, request = job
    # Not on this worker thread: a collection here could free Qt objects off the GUI thread (gui/collector.py).
    return make_sample(config, request, release_memory=False)


def _release_sample_memory() -> None:
    """make_sample's models collected, and their GPU memory given back, here on the GUI thread."""
    from core.train.sample_now import release_sample_memory

    release_sample_memory()


class SampleWindow(QDialog):
    def __init__(self, host: SampleHost, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.host = host
        self.setWindowTitle("Sample")
        self.setModal(False)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("What the video should show")
        self.prompt.setFixedHeight(self.fontMetrics().lineSpacing() * 4 + 12)
        self.negative = QLineEdit()
        self.negative.setPlaceholderText("What it should not show (optional)")
        self.numbers: dict[str, QSpinBox] = {}
        form = QFormLayout()
        form.addRow("Prompt", self.prompt)
        form.addRow("Negative prompt", self.negative)
        for key, label in NUMBERS:
            setting = lookup(f"sampling.{key}")
            spin = QSpinBox()
            spin.setRange(int(setting.minimum), int(setting.maximum))
            spin.setToolTip(setting.help)
            self.numbers[key] = spin
            form.addRow(label, spin)
        self.status = muted_label()
        self.make_button = QPushButton("Make sample")
        self.make_button.setDefault(True)
        self.make_button.clicked.connect(self.make)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.addButton(self.make_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.rejected.connect(self.hide)
        column = QVBoxLayout(self)
        column.addLayout(form)
        column.addWidget(self.status)
        column.addWidget(buttons)
        self._job = BackgroundJob(_make, 0, "the sample", self)
        self._job.finished_ok.connect(self._made)
        self._job.failed.connect(self._failed)
        self._job.busy.connect(self._busy)
        self.fill_from_settings()
        self.resize(460, self.sizeHint().height())

    def fill_from_settings(self) -> None:
        """The fields as the sampling settings have them (the first prompt, or none)."""
        sampling = self.host.config["sampling"]
        prompts = sampling.get("prompts") or []
        self.prompt.setPlainText(str(prompts[0]) if prompts else "")
        for key, spin in self.numbers.items():
            spin.setValue(int(sampling[key]))

    def request(self) -> SampleRequest:
        """The sample the fields ask for (guidance from the sampling settings)."""
        n = {key: spin.value() for key, spin in self.numbers.items()}
        return SampleRequest(
            self.prompt.toPlainText().strip(), width=n["width"], height=n["height"], frames=n["frames"],
            steps=n["inference_steps"], guidance_scale=float(self.host.config["sampling"]["guidance_scale"]),
            seed=n["seed"], negative_prompt=self.negative.text().strip(),
        )

    def make(self) -> None:
        request = self.request()
        if not request.prompt:
            self._say("Write a prompt first: what the video should show.", problem=True)
            return
        if self.host.run_panel.request_sample(request):
            self._say("Queued: the running training makes it after the current step; it appears in the Sampling tab.")
            return
        self._say("Loading the model and the newest weights...")
        self._job.request((copy.deepcopy(self.host.config), request), now=True)

    def is_busy(self) -> bool:
        return self._job.is_busy()

    def settle(self, timeout_ms: int = 300_000) -> bool:
        """Wait for a sample under way (tests, screenshots)."""
        return self._job.wait(timeout_ms)

    def shutdown(self) -> None:
        """Before the window goes: a sample under way is waited for (it cannot be cut short)."""
        self._job.shutdown()

    def _made(self, _job: Any, result: Any) -> None:
        _release_sample_memory()
        self._say(f"Written: {result.path.name}, with {result.weights.describe()}.")
        self.host.show_sample(result.path)

    def _failed(self, _job: Any, message: str) -> None:
        _release_sample_memory()
        self._say(message, problem=True)

    def _busy(self, busy: bool) -> None:
        self.make_button.setEnabled(not busy)

    def _say(self, text: str, *, problem: bool = False) -> None:
        self.status.setText(text)
        if problem:
            set_text_colour(self.status, PROBLEM_COLOUR)
        self.status.setForegroundRole(QPalette.ColorRole.WindowText if problem else QPalette.ColorRole.PlaceholderText)
