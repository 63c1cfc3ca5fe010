"""One truth for what can start: what a run would refuse shows while editing, on the fields it names
(by their labels), disables Start with the reason, and leaves the VRAM estimate refusing the same."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QMessageBox  # noqa: E402

from core.config.presets import DEMO_PRESET  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("VIDEO_TRAINER_HOME", str(folder))
    return folder


@pytest.fixture
def window(qtbot, monkeypatch: pytest.MonkeyPatch) -> MainWindow:
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: QMessageBox.StandardButton.Ok)
    win = MainWindow()
    qtbot.addWidget(win)
    win.load(DEMO_PRESET)
    win.show()
    win.start_check.settle()
    assert win.start_blockers() == [] and win.run_panel.start_button.isEnabled()
    return win


def field(win: MainWindow, tab: str, key: str):
    return win.forms[tab].fields[key]


def type_into(qtbot, editor, text: str) -> None:
    editor.clear()
    qtbot.keyClicks(editor, text)


def test_start_is_disabled_with_its_reason_on_an_empty_dataset(window: MainWindow, tmp_path: Path) -> None:
    empty = tmp_path / "no clips here"
    empty.mkdir()
    window.state.edit("datasets", [{"path": str(empty), "repeats": 1}])
    window.start_check.settle()
    button, status = window.run_panel.start_button, window.run_panel.status_label
    assert not button.isEnabled()
    assert "Nothing to train on" in status.text() and "no videos or images" in status.text()
    assert "Nothing to train on" in button.toolTip()
    assert window.run_panel.start() is False
    window.state.edit("datasets", window.state.baseline["datasets"])  # back to the demo clips
    window.start_check.settle()
    assert button.isEnabled() and window.start_blockers() == []


def test_offload_without_checkpointing_shows_while_editing_by_label(window: MainWindow, qtbot) -> None:
    assert window.config["gradient_checkpointing"] == "OFF"  # the demo's
    type_into(qtbot, field(window, "model", "layer_offload_fraction").editor, "0.5")
    window.start_check.settle()
    message = window.state.problem_for("gradient_checkpointing")
    assert message is not None and message == window.state.problem_for("layer_offload_fraction")
    assert "“Layer offload fraction” 0.5 needs “Gradient checkpointing” ON" in message
    assert "layer_offload_fraction" not in message and "gradient_checkpointing" not in message
    checkpointing = field(window, "model", "gradient_checkpointing")
    assert checkpointing.marked_widget().property("invalid") is True
    assert "“Layer offload fraction”" in checkpointing.editor.toolTip()
    assert not window.run_panel.start_button.isEnabled()
    assert "“Layer offload fraction”" in window.problems_label.text()

    # The VRAM estimate refuses the same values, with the same words.
    assert window.select_tab("model")
    window.settle()
    panel = window.estimate_panel
    assert panel.estimate is None and "fix the settings first" in panel.error_label.text()
    assert "“Layer offload fraction”" in panel.error_label.text()

    checkpointing.editor.setCurrentText("ON")
    window.start_check.settle()
    window.settle()
    assert window.start_blockers() == [] and window.run_panel.start_button.isEnabled()
    assert checkpointing.marked_widget().property("invalid") is not True
    assert panel.estimate is not None and panel.error_label.text() == ""


def test_a_lora_output_that_is_no_safetensors_file_is_marked(window: MainWindow, qtbot, tmp_path: Path) -> None:
    type_into(qtbot, field(window, "general", "output_path").editor, str(tmp_path / "result"))
    window.start_check.settle()
    message = window.state.problem_for("output_path")
    assert message is not None and message.startswith("“Output path”") and ".safetensors" in message
    assert not window.run_panel.start_button.isEnabled()


def test_a_model_folder_that_does_not_exist_is_said_before_start(window: MainWindow, qtbot, tmp_path: Path) -> None:
    type_into(qtbot, field(window, "general", "base_model").editor, str(tmp_path / "nowhere"))
    window.start_check.settle()
    message = window.state.problem_for("base_model")
    assert message is not None and "does not exist" in message
    assert not window.run_panel.start_button.isEnabled()


def test_offline_and_not_downloaded_is_one_line(window: MainWindow, qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    type_into(qtbot, field(window, "general", "base_model").editor, "no-such-org/no-such-model")
    window.start_check.settle()
    message = window.state.problem_for("base_model")
    assert message is not None and "downloading is off" in message and len(message.splitlines()) == 1


def test_tooltips_wrap(window: MainWindow) -> None:
    """Qt draws a plain-text tooltip on one line however long; rich text wraps."""
    tip = field(window, "model", "layer_offload_fraction").editor.toolTip()
    assert tip.startswith("<qt>") and len(tip) > 200
    assert window.forms["model"].fields["gradient_checkpointing"].widget.toolTip().startswith("<qt>")


def test_the_estimate_still_shows_for_a_known_model_not_downloaded(window: MainWindow, qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a hub id not in the cache blocks Start, but the estimate knows the model's sizes."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    window.state.edit("base_model", "Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    window.state.edit("model_type", "AUTO")
    window.start_check.settle()
    assert window.state.problem_for("base_model") is not None and not window.run_panel.start_button.isEnabled()
    assert window.select_tab("model")
    window.settle()
    assert window.estimate_panel.estimate is not None, window.estimate_panel.error_label.text()


def test_a_rule_over_two_fields_counts_once(window: MainWindow, qtbot) -> None:
    type_into(qtbot, field(window, "model", "layer_offload_fraction").editor, "0.5")
    window.start_check.settle()
    assert {p.key for p in window.start_blockers()} == {"gradient_checkpointing", "layer_offload_fraction"}
    assert "more)" not in window.run_panel.status_label.text() and "more)" not in window.problems_label.text()


def test_the_doctors_verdict_blocks_start_when_every_clip_is_broken(window: MainWindow, tmp_path: Path) -> None:
    """The file names look fine (a captioned clip), but the doctor's probing finds nothing usable."""
    folder = tmp_path / "broken clips"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"not a video at all" * 10)
    (folder / "clip.txt").write_text("a caption", encoding="utf-8")
    window.state.edit("datasets", [{"path": str(folder), "repeats": 1}])
    window.start_check.settle()
    assert window.run_panel.start_button.isEnabled()  # from the listing alone it could train
    assert window.select_tab("data")
    assert window.doctor_panel.settle()
    window.start_check.settle()
    status = window.run_panel.status_label.text()
    assert not window.run_panel.start_button.isEnabled()
    assert "Nothing to train on" in status and "dataset doctor" in status
    window.state.edit("datasets", window.state.baseline["datasets"])  # other dataset settings: the verdict no longer holds
    window.start_check.settle()
    assert window.run_panel.start_button.isEnabled()
