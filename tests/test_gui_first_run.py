"""The first run without questions: the very first start shows the demo preset with one line saying
that Start trains it offline, and picking a preset in the list loads it, asking before it drops
unsaved edits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QMessageBox  # noqa: E402

from core.config.presets import DEMO_PRESET, load_preset  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402

OTHER = "#wan 2.2 LoRA 8GB"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"  # empty: no window state, no last settings, as on a first start
    monkeypatch.setenv("VIDEO_TRAINER_HOME", str(folder))
    return folder


def open_window(qtbot) -> MainWindow:
    window = MainWindow()
    qtbot.addWidget(window)
    window.restore_last_settings()  # what gui.app.run_app does at start-up
    window.show()
    return window


def pick(window: MainWindow, name: str) -> None:
    """Choose a preset in the list as the user does (activated is the user's signal, not the window's)."""
    combo = window.preset_bar.combo
    index = combo.findText(name)
    combo.setCurrentIndex(index)
    combo.activated.emit(index)


def test_first_start_opens_the_demo_with_one_line_about_start(qtbot) -> None:
    window = open_window(qtbot)
    assert window.loaded is not None and window.loaded.name == DEMO_PRESET
    assert window.config == load_preset(DEMO_PRESET) and not window.state.is_modified()
    assert window.preset_bar.selected_name() == DEMO_PRESET
    note = window.preset_bar.note_label
    assert note.isVisible() and "Start" in note.text() and "offline" in note.text()
    assert len(note.text().splitlines()) == 1
    assert window.run_panel.start_button.isEnabled()


def test_second_start_puts_back_what_was_left_without_the_note(qtbot) -> None:
    window = open_window(qtbot)
    window.close()
    again = open_window(qtbot)
    assert again.loaded is not None and again.loaded.name == DEMO_PRESET
    assert not again.preset_bar.note_label.isVisible()


def test_picking_a_preset_loads_it_and_the_note_goes(qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Discard)
    window = open_window(qtbot)
    pick(window, OTHER)
    assert asked == []  # nothing edited: nothing to ask
    assert window.loaded is not None and window.loaded.name == OTHER
    assert window.config == load_preset(OTHER)
    assert not window.preset_bar.note_label.isVisible()


@pytest.mark.parametrize("answer", [QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Discard])
def test_picking_a_preset_over_unsaved_edits_asks(qtbot, monkeypatch: pytest.MonkeyPatch, answer) -> None:
    asked: list[str] = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or answer)
    window = open_window(qtbot)
    window.forms["lora"].fields["lora.rank"].editor.setValue(4)
    assert window.state.is_modified()
    pick(window, OTHER)
    assert len(asked) == 1 and "not saved" in asked[0]
    if answer == QMessageBox.StandardButton.Cancel:
        assert window.loaded.name == DEMO_PRESET and window.config["lora"]["rank"] == 4
        assert window.preset_bar.selected_name() == DEMO_PRESET  # the list shows what is loaded
    else:
        assert window.loaded.name == OTHER and window.config == load_preset(OTHER)
