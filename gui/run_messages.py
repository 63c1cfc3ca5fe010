"""The run panel's words and bar: durations, the download's progress, samples being made, how a run
ended or what the workspace tells of it, and the dialog of a failed run."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QUrl
from PySide6.QtWidgets import QMessageBox, QProgressBar, QWidget

from core.log_setup import log_file_path

from .train_worker import RunError, RunOutcome

if TYPE_CHECKING:
    from core.train.run_history import RunHistory

GIB = 2**30
DOWNLOAD_SCALE = 1000  # the progress bar's steps while the base model downloads


class RunProgress(QProgressBar):
    """The run panel's bar: steps, samples being made, a download, or busy (maximum 0)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setTextVisible(True)
        self.show_state(0, 1, "not started")

    def show_state(self, value: int, maximum: int, text: str) -> None:
        self.setRange(0, maximum)
        self.setValue(value)
        self.setFormat(text)

    def show_download(self, done: int, total: int | None, text: str) -> None:
        """The base model's bytes downloaded so far (busy while the size is not known)."""
        if total:
            self.show_state(min(DOWNLOAD_SCALE, round(DOWNLOAD_SCALE * done / total)), DOWNLOAD_SCALE, text)
        else:
            self.show_state(0, 0, text)


def format_duration(seconds: float | None) -> str:
    """1:02:03, 2:03, or '?' without an estimate."""
    if seconds is None:
        return "?"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def format_bytes(value: int) -> str:
    """2.41 GB, 380 MB (the sizes a hub page shows)."""
    if value >= 10**9:
        return f"{value / 10**9:.2f} GB"
    return f"{value / 10**6:.0f} MB"


def download_text(name: str, done: int, total: int | None) -> tuple[str, str]:
    """(the progress bar's text, the status line) while the base model downloads."""
    if not total:
        return f"downloading {name}", f"Downloading the base model {name} from the Hugging Face hub..."
    percent = 100 * done / total
    return (f"downloading {name}: {format_bytes(done)} of {format_bytes(total)} ({percent:.0f}%)",
            f"Downloading the base model {name} from the Hugging Face hub (once; later runs use the copy)...")


def error_box(parent: QWidget, error: RunError, title: str, recent: list[str]) -> QMessageBox:
    """The dialog of a failed run: the one-line reason; for a bug the log file and the traceback
    behind "Show Details", for the user's error the settings it names and the run's last messages."""
    box = QMessageBox(parent)
    box.setWindowTitle(title)
    box.setText(error.message)
    if error.bug:
        box.setIcon(QMessageBox.Icon.Critical)
        box.setInformativeText(f"This is a bug in Video Trainer. The details are also in the log file:\n{log_file_path()}")
        box.setDetailedText(error.details)
    else:
        box.setIcon(QMessageBox.Icon.Warning)
        box.setInformativeText("Fix this and press Start again.")
        settings = f"Settings: {', '.join(error.keys)}\n\n" if error.keys else ""
        box.setDetailedText(f"{settings}The run's last messages:\n" + "\n".join(recent) + f"\n\nLog file: {log_file_path()}")
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    return box


def outcome_text(outcome: RunOutcome) -> tuple[str, str]:
    """(the progress bar's text, the status line) once a run has ended."""
    loss = f", final loss {outcome.final_loss:.4f}" if outcome.final_loss is not None else ""
    skipped = f", {outcome.skipped_steps} step(s) skipped (loss not finite)" if outcome.skipped_steps else ""
    if outcome.error is not None:
        return "failed", f"Failed: {outcome.error.message}"
    if outcome.stopped_early:
        return (f"stopped at step {outcome.steps} / {outcome.total_steps}",
                f"Stopped after {outcome.steps} of {outcome.total_steps} steps{loss}{skipped}.")
    return (f"done: {outcome.steps} / {outcome.total_steps} steps",
            f"Finished {outcome.steps} of {outcome.total_steps} steps{loss}{skipped}.")


def sampling_text(step: int, done: int, count: int) -> tuple[str, str]:
    """(the progress bar's text, the status line) while sample `done + 1` of `count` is made."""
    return (f"sampling {done + 1} / {count} after step {step}",
            f"Sampling: making video {done + 1} of {count} after step {step} (training waits)...")


def history_bar_text(history: RunHistory) -> str:
    """The progress bar's text for a workspace's run shown between runs (core.train.run_history)."""
    if history.finished:
        return f"done: {history.steps} / {history.total_steps} steps"
    return f"stopped at step {history.steps} / {history.total_steps}"


def output_links(paths: list[str]) -> str:
    """The files a run wrote, each a link that opens its folder."""
    return "<br>".join(f'<a href="{QUrl.fromLocalFile(str(Path(p).parent)).toString()}">{html.escape(p)}</a>' for p in paths)
