"""The window: tabs cover the schema, presets load and save back equal, edits are validated, and
start-up neither needs a display nor imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

# Before pytest-qt's session QApplication exists: no display here, and none needed.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QInputDialog, QMessageBox  # noqa: E402

from core.config.presets import list_presets, load_preset  # noqa: E402
from core.config.settings import iter_settings, sparse  # noqa: E402
from gui.launch import TAB_NAMES  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402
from gui.tab_layout import TABS, tab_keys  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = [p.name for p in list_presets() if p.bundled]
PRESET_8GB = "#wan 2.2 LoRA 8GB"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Per-user folders (presets, window state, logs) inside the test's own folder."""
    folder = tmp_path / "home"
    monkeypatch.setenv("VIDEO_TRAINER_HOME", str(folder))
    return folder


@pytest.fixture
def window(qtbot, monkeypatch: pytest.MonkeyPatch) -> MainWindow:
    # A modal question would block the test: unsaved changes are discarded, overwrites refused.
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: QMessageBox.StandardButton.Ok)
    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    return win


def field(win: MainWindow, tab: str, key: str):
    return win.forms[tab].fields[key]


def problem_keys(win: MainWindow) -> set[str]:
    return {p.key for p in win.invalid_settings()}


# -- the tab table ---------------------------------------------------------------------------------


def test_every_setting_is_on_exactly_one_tab() -> None:
    counts = Counter(key for spec in TABS for key in tab_keys(spec))
    schema_keys = [key for key, _ in iter_settings()]
    assert sorted(counts) == sorted(schema_keys), "settings missing from (or unknown to) gui/tab_layout.py"
    assert {k: n for k, n in counts.items() if n > 1} == {}, "settings on more than one tab"
    assert tuple(spec.name for spec in TABS) == TAB_NAMES


# -- presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_preset_loads_and_saves_back_equal(window: MainWindow, name: str) -> None:
    window.load(name)
    assert window.config == load_preset(name)  # showing it in the widgets changed nothing
    assert sparse(window.config) == sparse(load_preset(name))
    assert not window.state.is_modified() and window.invalid_settings() == []
    assert window.preset_bar.selected_name() == name

    window.save_to("saved copy")
    assert load_preset("saved copy") == load_preset(name)


def test_user_preset_from_window_is_listed_and_reloads_equal(window: MainWindow, monkeypatch: pytest.MonkeyPatch) -> None:
    window.load(PRESET_8GB)
    field(window, "lora", "lora.rank").editor.setValue(32)
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("my run", True))
    window.preset_bar.save_button.click()  # a bundled preset: Save asks a name, like Save as

    names = window.preset_bar.names()
    assert names.index("my run") > names.index(PRESET_8GB)  # user presets after the bundled ones
    assert window.preset_bar.selected_name() == "my run"
    assert not window.state.is_modified() and not window.isWindowModified()
    assert window.windowTitle().startswith("my run")
    saved = dict(window.config)

    window.load("#wan 2.2 Finetune")
    window.preset_bar.select("my run")
    window.preset_bar.load_button.click()
    assert window.config == saved == load_preset("my run")
    assert window.config["lora"]["rank"] == 32


def test_save_as_asks_before_replacing_a_user_preset(window: MainWindow, monkeypatch: pytest.MonkeyPatch) -> None:
    window.load(PRESET_8GB)
    window.save_to("mine")
    field(window, "training", "batch_size").editor.setValue(2)
    answers = iter([("mine", True), ("", False)])  # the existing name, then cancel
    asked: list[str] = []
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: next(answers))
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    assert window.save_as() is False
    assert asked and "Replace" in asked[0]
    assert load_preset("mine")["batch_size"] == 1  # not replaced


def test_broken_user_preset_is_listed_disabled(window: MainWindow, home: Path) -> None:
    (home / "presets").mkdir(parents=True)
    (home / "presets" / "broken.json").write_text("{ not json", encoding="utf-8")
    window.preset_bar.refresh()
    assert "broken" in window.preset_bar.names()
    assert not window.preset_bar.is_enabled("broken")
    index = window.preset_bar.combo.findText("broken")
    assert "Cannot be loaded" in window.preset_bar.combo.itemData(index, Qt.ItemDataRole.ToolTipRole)


def test_presets_are_listed_by_name_and_read_when_the_list_is_first_used(qtbot, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gui.preset_bar as preset_bar_module

    (home / "presets").mkdir(parents=True)
    (home / "presets" / "broken.json").write_text("{ not json", encoding="utf-8")
    read: list[str] = []
    real_read = preset_bar_module.read_preset_info
    monkeypatch.setattr(preset_bar_module, "read_preset_info", lambda file: read.append(file.name) or real_read(file))
    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    bar = win.preset_bar
    assert bar.names() == [*BUNDLED, "broken"] and read == []  # listed by file name, nothing read yet
    qtbot.mousePress(bar.combo, Qt.MouseButton.LeftButton)  # the user opens the list: all are read first
    bar.combo.hidePopup()
    assert sorted(read) == sorted(bar.names())  # each once
    broken = bar.combo.findText("broken")
    assert not bar.combo.model().item(broken).isEnabled()
    assert "Cannot be loaded" in bar.combo.itemData(broken, Qt.ItemDataRole.ToolTipRole)
    described = next(p for p in list_presets() if p.description)
    assert bar.combo.itemData(bar.combo.findText(described.name), Qt.ItemDataRole.ToolTipRole) == described.description


def test_last_preset_and_geometry_are_remembered(window: MainWindow, qtbot) -> None:
    window.load(PRESET_8GB)
    window.resize(640, 500)
    window.close()
    again = MainWindow()
    qtbot.addWidget(again)
    again.restore_last_settings()
    assert again.loaded is not None and again.loaded.name == PRESET_8GB
    assert (again.width(), again.height()) == (640, 500)
    assert again.config == load_preset(PRESET_8GB) and not again.state.is_modified()


def test_last_settings_are_restored_even_unsaved(qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Cancel)
    window = MainWindow()
    qtbot.addWidget(window)
    window.show()
    window.load(PRESET_8GB)
    field(window, "training", "batch_size").editor.setValue(3)
    field(window, "data", "frames").editor.setValue(17)  # breaks a rule (max_frames 9): kept as it is
    window.select_tab("data")
    window.side_splitters["data"].setSizes([500, 300])
    panel_width = window.side_splitters["data"].sizes()[1]
    assert window.close() and asked == []  # nothing is lost by closing, so nothing is asked

    again = MainWindow()
    qtbot.addWidget(again)
    again.restore_last_settings()
    assert again.loaded is not None and again.loaded.name == PRESET_8GB  # the preset they were based on
    assert again.config["batch_size"] == 3 and again.config["frames"] == 17
    assert again.state.is_modified() and again.isWindowModified()
    assert again.preset_bar.modified_label.text() == "modified"
    assert problem_keys(again) == {"frames", "video_config.max_frames"}
    assert field(again, "training", "batch_size").editor.value() == 3
    again.show()
    again.select_tab("data")
    assert again.side_splitters["data"].sizes()[1] == panel_width  # the dividers come back too


def test_unreadable_last_settings_fall_back_to_the_last_preset(qtbot, home: Path) -> None:
    window = MainWindow()
    qtbot.addWidget(window)
    window.load(PRESET_8GB)
    window.close()
    (home / "state" / "last_settings.json").write_text("{ broken", encoding="utf-8")
    again = MainWindow()
    qtbot.addWidget(again)
    again.restore_last_settings()
    assert again.loaded.name == PRESET_8GB and again.config == load_preset(PRESET_8GB)


# -- editing ---------------------------------------------------------------------------------------


def test_spin_box_edit_changes_config_and_marks_modified(window: MainWindow) -> None:
    window.load(PRESET_8GB)
    assert window.preset_bar.modified_label.text() == ""
    field(window, "training", "batch_size").editor.setValue(3)
    assert window.config["batch_size"] == 3
    assert window.isWindowModified() and window.preset_bar.modified_label.text() == "modified"
    field(window, "training", "batch_size").editor.setValue(1)  # back to the preset's value
    assert not window.isWindowModified()


def test_embedding_shows_its_tab_and_hides_lora(window: MainWindow) -> None:
    window.load(PRESET_8GB)
    names = [spec.name for spec in TABS]
    lora, embedding = names.index("lora"), names.index("embedding")
    assert window.tabs.isTabVisible(lora) and not window.tabs.isTabVisible(embedding)
    method = field(window, "general", "training_method").editor
    method.setCurrentText("EMBEDDING")
    assert window.config["training_method"] == "EMBEDDING"
    assert window.tabs.isTabVisible(embedding) and not window.tabs.isTabVisible(lora)
    assert field(window, "general", "output_format").widget.isHidden()  # LoRA only
    assert field(window, "model", "transformer.learning_rate").widget.isHidden()
    assert window.select_tab("embedding") and not window.select_tab("lora")
    method.setCurrentText("LORA")
    assert window.tabs.isTabVisible(lora) and not field(window, "general", "output_format").widget.isHidden()


def test_stop_after_switches_steps_and_epochs(window: MainWindow) -> None:
    steps, epochs = field(window, "training", "max_steps"), field(window, "training", "epochs")
    assert not steps.widget.isHidden() and epochs.widget.isHidden()
    field(window, "training", "stop_after").editor.setCurrentText("EPOCHS")
    assert steps.widget.isHidden() and not epochs.widget.isHidden()


def test_text_in_a_number_field_is_marked(window: MainWindow, qtbot) -> None:
    window.load(PRESET_8GB)
    rate = field(window, "training", "learning_rate").editor
    rate.clear()
    qtbot.keyClicks(rate, "abc")
    assert "learning_rate" in problem_keys(window)
    assert rate.property("invalid") is True and "abc" in rate.toolTip()
    assert "“Learning rate”" in window.problems_label.text()  # the field's label, not its key
    assert window.config["learning_rate"] == 0.0003  # the last good value is kept
    assert window.save_as() is False  # refuses to save while a setting is wrong

    rate.clear()
    qtbot.keyClicks(rate, "5e-5")
    assert window.invalid_settings() == [] and window.config["learning_rate"] == 5e-05
    assert not rate.property("invalid") and window.problems_label.text() == ""
    rate.editingFinished.emit()
    assert rate.text() == "0.00005"  # tidied once valid


def test_empty_part_learning_rate_means_null(window: MainWindow, qtbot) -> None:
    window.load("#wan 2.2 Finetune")
    rate = field(window, "model", "text_encoder.learning_rate").editor
    assert rate.text() == "0.00005"
    rate.selectAll()
    qtbot.keyClick(rate, "\b")
    assert window.config["text_encoder"]["learning_rate"] is None and window.invalid_settings() == []


def test_frames_above_max_frames_is_marked(window: MainWindow) -> None:
    window.load(PRESET_8GB)  # frames 9, video_config.max_frames 9
    frames = field(window, "data", "frames")
    frames.editor.setValue(17)
    assert window.config["frames"] == 17
    assert problem_keys(window) == {"frames", "video_config.max_frames"}  # the rule marks both
    assert frames.marked_widget().property("invalid") is True and "Max frames" in frames.editor.toolTip()
    window_field = field(window, "video", "video_config.max_frames")
    assert window_field.marked_widget().property("invalid") is True
    assert not window.tabs.tabIcon([s.name for s in TABS].index("data")).isNull()
    assert not window.tabs.tabIcon([s.name for s in TABS].index("video")).isNull()
    field(window, "video", "video_config.max_frames").editor.setValue(32)
    assert window.invalid_settings() == [] and not frames.marked_widget().property("invalid")


def test_lists_and_datasets_edit_the_config(window: MainWindow, tmp_path: Path) -> None:
    field(window, "sampling", "sampling.prompts").editor.setPlainText("a cat\n\n  a dog  \n")
    assert window.config["sampling"]["prompts"] == ["a cat", "a dog"]

    datasets = field(window, "data", "datasets")
    datasets.add_folder(str(tmp_path))
    assert [(d["path"], d["repeats"]) for d in window.config["datasets"]] == [(str(tmp_path), 1)]
    # The folder's other options (set in the dataset editor below) survive an edit in the table.
    window.state.edit("datasets", [{**window.config["datasets"][0], "caption_prefix": "ohwx"}])
    datasets.editor.cellWidget(0, 1).setValue(3)
    assert window.config["datasets"][0]["repeats"] == 3
    assert window.config["datasets"][0]["caption_prefix"] == "ohwx"
    datasets.editor.selectRow(0)
    assert datasets.remove_button.isEnabled()
    datasets.remove_button.click()
    assert window.config["datasets"] == []


def test_unexpected_error_is_logged_and_shown_with_details(qtbot, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from gui.app import install_excepthook

    shown: list[tuple[str, str]] = []
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # undone after the test
    monkeypatch.setattr(QMessageBox, "exec", lambda box: shown.append((box.text(), box.detailedText())) or 0)
    install_excepthook(interactive=True)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    assert shown[0][0] == "Something went wrong: RuntimeError: boom"
    assert "Traceback" in shown[0][1] and "second line" in shown[0][1]
    assert any(r.exc_info and r.levelname == "ERROR" for r in caplog.records)


def test_installed_pyside_does_not_lose_references(window: MainWindow) -> None:
    # PySide6 6.12.0 on Python 3.11 loses a reference to None per void call and to True per
    # Signal.emit, which aborts Python after a few dozen edits in the form; pyproject.toml pins
    # PySide6 below 6.12 there. This guards the pin.
    from PySide6.QtCore import QObject, Signal

    class Probe(QObject):
        ping = Signal()

    probe = Probe()
    before = sys.getrefcount(None) + sys.getrefcount(True)
    for _ in range(64):
        probe.setObjectName("probe")
        probe.ping.emit()
    lost = before - sys.getrefcount(None) - sys.getrefcount(True)
    assert sys.version_info >= (3, 12) or lost < 32


# -- start-up, in a fresh process --------------------------------------------------------------------


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "VIDEO_TRAINER_HOME": str(home)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_window_start_does_not_import_torch(tmp_path: Path, home: Path) -> None:
    shot = tmp_path / "shot.png"
    code = (
        "import sys, main\n"
        # The Model tab: its VRAM estimate is computed (and waited for) before the screenshot too.
        f"rc = main.main(['gui', '--preset', {PRESET_8GB!r}, '--tab', 'model', '--screenshot', {str(shot)!r}])\n"
        "print('heavy:', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
        "sys.exit(rc)\n"
    )
    result = _run(["-c", code], home)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout
    assert shot.stat().st_size > 0


def test_screenshot_command_writes_a_png(tmp_path: Path, home: Path) -> None:
    shot = tmp_path / "x.png"
    result = _run(["main.py", "gui", "--preset", PRESET_8GB, "--tab", "model", "--screenshot", str(shot)], home)
    assert result.returncode == 0, result.stderr
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content", ["{ not json", json.dumps({"lora": {"rank": "big"}})])
def test_bad_preset_file_is_one_line_and_exit_2(tmp_path: Path, home: Path, content: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    result = _run(["main.py", "gui", "--preset", str(bad), "--screenshot", str(tmp_path / "no.png")], home)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "bad.json" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "no.png").exists()
