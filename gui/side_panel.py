"""What the panels beside a tab's settings share: a title, quiet text, and work only while visible.

A side panel (the dataset doctor on the Data tab, the VRAM estimate on the Model tab, the samples
on the Sampling tab) follows the settings. Hidden, it only notes that it is out of date; shown, it
brings itself up to date, so a setting changed on another tab costs nothing until it is looked at.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont, QPalette, QShowEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

PANEL_MIN_WIDTH = 300
PROBLEM_COLOUR = "#c9302c"  # what stops a run
NOTE_COLOUR = "#a15c00"  # 'modified' and other things to notice


def set_text_colour(label: QLabel, colour: str) -> None:
    """A label's text colour by its palette (no style sheet: those re-polish widgets, and cost time)."""
    palette = label.palette()
    palette.setColor(QPalette.ColorRole.WindowText, QColor(colour))
    label.setPalette(palette)


def muted_label(text: str = "", *, wrap: bool = True) -> QLabel:
    """A quiet line: hints, errors that are not the user's fault to act on now, units."""
    label = QLabel(text)
    label.setWordWrap(wrap)
    label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def title_label(text: str) -> QLabel:
    label = QLabel(text)
    font = QFont(label.font())
    font.setBold(True)
    font.setPointSizeF(font.pointSizeF() * 1.1)
    label.setFont(font)
    return label


class SidePanel(QWidget):
    """A column with a title row; subclasses put their content in `self.body` and implement refresh().

    With scroll=True the body scrolls when the panel is short (the doctor's tables, the estimate's rows).
    """

    def __init__(self, title: str, parent: QWidget | None = None, *, scroll: bool = True) -> None:
        super().__init__(parent)
        self.setMinimumWidth(PANEL_MIN_WIDTH)
        self._stale = True  # out of date with the settings: brought up to date when next shown
        outer = QVBoxLayout(self)
        outer.setContentsMargins(12, 12, 16, 12)
        outer.setSpacing(8)
        self.header = QHBoxLayout()
        self.header.addWidget(title_label(title))
        self.header.addStretch(1)
        outer.addLayout(self.header)
        self.body = QVBoxLayout()
        self.body.setSpacing(8)
        if scroll:
            content = QWidget()
            content.setLayout(self.body)
            self.body.setContentsMargins(0, 0, 4, 0)
            area = QScrollArea()
            area.setWidgetResizable(True)
            area.setFrameShape(QFrame.Shape.NoFrame)
            area.setWidget(content)
            outer.addWidget(area, 1)
        else:
            outer.addLayout(self.body, 1)

    def settings_changed(self) -> None:
        """The settings changed: refresh now if visible, else when next shown."""
        self._stale = True
        if self.isVisible():
            self._stale = False
            self.refresh()

    def refresh(self) -> None:
        """Bring the panel up to date with the settings (cheaply; heavy work goes to a BackgroundJob)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Before the window goes: end background work."""

    def settle(self, timeout_ms: int = 30_000) -> bool:
        """Finish the background work under way or waiting (screenshots, tests); False on timeout."""
        return True

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self._stale:
            self._stale = False
            self.refresh()
