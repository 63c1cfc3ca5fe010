"""The run panel's words: durations, the download's progress, and the dialog of a failed run."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox, QWidget

from core.log_setup import log_file_path

from .train_worker import RunError

GIB = 2**30


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
