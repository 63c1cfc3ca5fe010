"""Light and dark: the window follows the system's colour scheme, or the one the user picked.

View > Theme offers System, Light and Dark; the choice is kept with the window's state (window.ini,
gui/window_state.py), not in the training settings. System reads Qt's `QStyleHints.colorScheme()`
(Qt 6.5+) and follows its `colorSchemeChanged` signal while the window is open. Dark is the Fusion
style with the palette below (Fusion draws every control from the palette; the platform styles do
not all do so). Light puts back the style and palette the application started with. Everything that
paints with its own colours follows the palette's change event: the plots (gui/plots.py) take their
background, axes and legend text from it.
"""

from __future__ import annotations

import logging

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

log = logging.getLogger(__name__)

THEMES = ("SYSTEM", "LIGHT", "DARK")
THEME_KEY = "theme"  # in window.ini
THEME_LABELS = {"SYSTEM": "&System", "LIGHT": "&Light", "DARK": "&Dark"}


def dark_palette() -> QPalette:
    """A dark palette for the Fusion style: light text on dark grey, a blue highlight, greyed disabled text."""
    palette = QPalette()
    roles = QPalette.ColorRole
    colours = {
        roles.Window: "#2d2d30", roles.WindowText: "#e6e6e6", roles.Base: "#1e1e1e", roles.AlternateBase: "#2a2a2d",
        roles.ToolTipBase: "#3c3c40", roles.ToolTipText: "#e6e6e6", roles.PlaceholderText: "#9a9a9a",
        roles.Text: "#e6e6e6", roles.Button: "#3a3a3d", roles.ButtonText: "#e6e6e6", roles.BrightText: "#ff6b66",
        roles.Light: "#4a4a4e", roles.Midlight: "#404044", roles.Mid: "#303033", roles.Dark: "#1a1a1c",
        roles.Shadow: "#000000", roles.Highlight: "#3d7ad6", roles.HighlightedText: "#ffffff",
        roles.Link: "#6fa8ff", roles.LinkVisited: "#b48cf0",
    }
    for role, colour in colours.items():
        palette.setColor(role, QColor(colour))
    for role in (roles.WindowText, roles.Text, roles.ButtonText, roles.PlaceholderText):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor("#7a7a7a"))
    palette.setColor(QPalette.ColorGroup.Disabled, roles.Highlight, QColor("#505054"))
    return palette


def is_dark(palette: QPalette) -> bool:
    """Whether a palette is a dark one (its window darker than its text)."""
    return palette.color(QPalette.ColorRole.Window).lightness() < palette.color(QPalette.ColorRole.WindowText).lightness()


def _fusion_light_palette() -> QPalette:
    from PySide6.QtWidgets import QStyleFactory

    style = QStyleFactory.create("Fusion")
    return style.standardPalette() if style is not None else QPalette()


class Theme(QObject):
    """The application's theme: `choose(mode)` applies it; `dark` says what is shown now, and
    `changed(dark)` is emitted when that changes."""

    changed = Signal(bool)

    def __init__(self, app: QApplication, mode: str = "SYSTEM", parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.app = app
        self.mode = mode if mode in THEMES else "SYSTEM"
        # What Light puts back: the style and palette the application started with (Fusion's own
        # light palette where the platform started it dark), taken when it first turns dark: asking
        # for the style makes it, which a light start leaves to the first paint.
        self._light: tuple[str, QPalette] | None = None
        self.dark = False
        QGuiApplication.styleHints().colorSchemeChanged.connect(self._system_changed)
        self._apply(self._wants_dark(QGuiApplication.styleHints().colorScheme()))

    def choose(self, mode: str) -> None:
        """Apply "SYSTEM", "LIGHT" or "DARK"."""
        if mode not in THEMES:
            raise ValueError(f"unknown theme {mode!r}; one of {', '.join(THEMES)}")
        self.mode = mode
        self._apply(self._wants_dark(QGuiApplication.styleHints().colorScheme()))

    def _wants_dark(self, scheme: Qt.ColorScheme) -> bool:
        if self.mode == "SYSTEM":
            return scheme == Qt.ColorScheme.Dark
        return self.mode == "DARK"

    def _system_changed(self, scheme: Qt.ColorScheme) -> None:
        if self.mode == "SYSTEM":
            self._apply(scheme == Qt.ColorScheme.Dark)

    def _set_style(self, name: str) -> None:
        # Only for another style: setStyle replaces (and deletes) the style object even for the same
        # name, and Linux desktops mostly start in Fusion already.
        if self.app.style().name().lower() != name.lower():
            self.app.setStyle(name)

    def _apply(self, dark: bool) -> None:
        if dark == self.dark:
            return  # a light start costs nothing: the application's own look stays as it is
        if dark:
            if self._light is None:
                started = self.app.palette()
                self._light = (self.app.style().name(), QPalette(started) if not is_dark(started) else _fusion_light_palette())
            self._set_style("fusion")
            self.app.setPalette(dark_palette())
        else:
            assert self._light is not None  # dark before: it was taken then
            style, palette = self._light
            self._set_style(style)
            self.app.setPalette(palette)
        self.dark = dark
        log.debug("theme: %s (%s)", "dark" if dark else "light", self.mode)
        self.changed.emit(dark)
