"""View > Theme: Dark gives the window a dark palette and the plots a dark background, Light puts back
the start's look, System follows the platform's colorSchemeChanged, and the choice is kept in window.ini."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import pyqtgraph as pg

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication, QMessageBox

from gui.main_window import MainWindow
from gui.theme import THEME_KEY
from gui.window_state import window_settings


@pytest.fixture
def window(qtbot, monkeypatch: pytest.MonkeyPatch) -> Iterator[MainWindow]:
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)
    win = MainWindow(remember=False)
    qtbot.addWidget(win)
    win.show()
    yield win
    win.menus.choose_theme("LIGHT")  # the application is shared by the tests that follow


def _window_colour() -> int:
    return QApplication.palette().color(QPalette.ColorRole.Window).lightness()


def _plot_background(win: MainWindow) -> int:
    return win.plots.canvas.backgroundBrush().color().lightness()


def test_dark_changes_the_palette_and_the_plots_and_light_puts_them_back(qtbot, window: MainWindow) -> None:
    light_window, light_plots = _window_colour(), _plot_background(window)
    assert light_window > 128 and light_plots > 128  # the offscreen platform starts light
    window.menus.theme_actions["DARK"].trigger()
    assert window.menus.theme.dark and window.menus.theme_actions["DARK"].isChecked()
    assert _window_colour() < 80 and QApplication.style().name().lower() == "fusion"
    qtbot.waitUntil(lambda: _plot_background(window) < 80)  # the plots follow the palette's change event
    axis = window.plots.plots["loss"].getAxis("left")
    assert axis.textPen().color().lightness() > 180  # light text on the dark background
    legend_label = window.plots.legends["loss"].items[0][1]
    assert pg.mkColor(legend_label.opts["color"]).lightness() > 180
    assert window.plots.curve_item("loss_smoothed").opts["pen"].color().name() == "#8ec0ff"
    window.menus.theme_actions["LIGHT"].trigger()
    assert _window_colour() == light_window
    qtbot.waitUntil(lambda: _plot_background(window) == light_plots)
    assert window.plots.curve_item("loss_smoothed").opts["pen"].color().name() == "#123f80"


def test_system_follows_the_platforms_colour_scheme(qtbot, window: MainWindow) -> None:
    hints = QGuiApplication.styleHints()
    window.menus.theme_actions["SYSTEM"].trigger()
    assert not window.menus.theme.dark
    hints.colorSchemeChanged.emit(Qt.ColorScheme.Dark)  # as the platform says when the desktop turns dark
    assert window.menus.theme.dark and _window_colour() < 80
    qtbot.waitUntil(lambda: _plot_background(window) < 80)
    hints.colorSchemeChanged.emit(Qt.ColorScheme.Light)
    assert not window.menus.theme.dark and _window_colour() > 128
    window.menus.theme_actions["LIGHT"].trigger()  # a chosen theme no longer follows the system
    hints.colorSchemeChanged.emit(Qt.ColorScheme.Dark)
    assert not window.menus.theme.dark and _window_colour() > 128


def test_the_choice_is_kept_with_the_window_state(qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)
    first = MainWindow(remember=True)
    qtbot.addWidget(first)
    try:
        first.menus.theme_actions["DARK"].trigger()
        assert window_settings().value(THEME_KEY) == "DARK"
        second = MainWindow(remember=True)  # the next start
        qtbot.addWidget(second)
        assert second.menus.theme.mode == "DARK" and second.menus.theme_actions["DARK"].isChecked()
        assert _window_colour() < 80
        second.menus.choose_theme("LIGHT")
    finally:
        first.menus.choose_theme("LIGHT")
    assert window_settings().value(THEME_KEY) == "LIGHT" and _window_colour() > 128
