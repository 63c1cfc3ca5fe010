"""The dataset editor on the Data tab: captions edited and saved atomically beside the clip (or in
captions/), the filters, the folder's options, folders dropped on the tab, and thumbnails made off
the GUI thread and cached."""

from __future__ import annotations

import copy
import errno
import os
import threading
from pathlib import Path

import pytest
from media_factory import make_clip, make_corrupt, make_image
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QLineEdit

import core.atomic
import core.data.thumbnails as thumbnails_module
from core.config import load_preset
from core.data.discovery import discover
from gui.config_state import ConfigState
from gui.dataset_editor import DatasetEditor
from gui.main_window import MainWindow

PRESET = "#demo tiny wan LoRA"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two captioned clips, an image, a clip without a caption and a broken clip (captioned)."""
    folder = tmp_path_factory.mktemp("editor-source")
    for name in ("a", "b"):
        make_clip(folder / f"{name}.mp4", width=96, height=64, fps=16, seconds=1.0)
        (folder / f"{name}.txt").write_text(f"clip {name}\n", encoding="utf-8")
    make_image(folder / "still.png")
    (folder / "still.txt").write_text("a still", encoding="utf-8")
    make_clip(folder / "nocaption.mp4", fps=16, seconds=1.0)
    make_corrupt(folder / "broken.mp4")
    (folder / "broken.txt").write_text("broken", encoding="utf-8")
    return folder


@pytest.fixture
def dataset(source: Path, tmp_path: Path) -> Path:
    """A fresh copy per test: the tests write captions."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def _state(*folders: Path) -> ConfigState:
    state = ConfigState()
    config = copy.deepcopy(load_preset(PRESET))
    config["datasets"] = [{"path": str(f), "repeats": 1} for f in folders]
    state.replace(config)
    return state


@pytest.fixture
def editor(qtbot, dataset: Path) -> DatasetEditor:
    widget = DatasetEditor(_state(dataset))
    qtbot.addWidget(widget)
    widget.resize(1000, 600)
    widget.show()
    assert widget.settle()
    yield widget
    widget.shutdown()


def test_a_caption_edited_in_the_editor_is_saved_to_its_file(editor: DatasetEditor, dataset: Path) -> None:
    assert editor.select_clip(dataset / "a.mp4")
    assert editor.caption_edit.toPlainText() == "clip a"
    editor.caption_edit.setPlainText("a red square slides to the right")
    assert editor.save_button.isEnabled()
    editor.save_button.click()
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "a red square slides to the right\n"
    assert not editor.save_button.isEnabled()
    # Moving to another clip saves what was typed, without asking.
    editor.caption_edit.setPlainText("the same square, faster")
    assert editor.select_clip(dataset / "b.mp4")
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "the same square, faster\n"
    assert editor.caption_edit.toPlainText() == "clip b"
    # The file is what training reads.
    items, _ = discover(dataset)
    assert {i.path.name: i.caption for i in items}["a.mp4"] == "the same square, faster"


def test_a_clip_without_a_caption_gets_a_caption_file(editor: DatasetEditor, dataset: Path) -> None:
    assert editor.select_clip(dataset / "nocaption.mp4")
    assert editor.caption_edit.toPlainText() == ""
    editor.caption_edit.setPlainText("a clip that had no caption")
    assert editor.save_caption()
    assert (dataset / "nocaption.txt").read_text(encoding="utf-8") == "a clip that had no caption\n"
    items, _ = discover(dataset)
    assert "nocaption.mp4" in {i.path.name for i in items}


def test_a_caption_in_a_captions_folder_is_saved_there(qtbot, tmp_path: Path, source: Path) -> None:
    root = tmp_path / "paired"
    (root / "videos").mkdir(parents=True)
    (root / "captions").mkdir()
    (root / "videos" / "clip.mp4").write_bytes((source / "a.mp4").read_bytes())
    (root / "captions" / "clip.txt").write_text("paired caption", encoding="utf-8")
    widget = DatasetEditor(_state(root))
    qtbot.addWidget(widget)
    widget.show()
    assert widget.settle()
    assert widget.select_clip(root / "videos" / "clip.mp4")
    assert widget.caption_edit.toPlainText() == "paired caption"
    widget.caption_edit.setPlainText("edited in captions/")
    assert widget.save_caption()
    assert (root / "captions" / "clip.txt").read_text(encoding="utf-8") == "edited in captions/\n"
    assert not (root / "videos" / "clip.txt").exists()
    widget.shutdown()


def test_a_failed_write_keeps_the_old_caption(editor: DatasetEditor, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(core.atomic.os, "replace", no_space)
    assert editor.select_clip(dataset / "a.mp4")
    editor.caption_edit.setPlainText("this will not fit")
    assert not editor.save_caption()
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "clip a\n"
    assert "could not write the caption" in editor.note_label.text() and "a.txt" in editor.note_label.text()
    assert not [p for p in dataset.iterdir() if p.name.endswith(".tmp")], "the temporary file is removed"
    assert editor.save_button.isEnabled(), "what was typed is still there to save again"
    assert editor.caption_edit.toPlainText() == "this will not fit"


def test_an_empty_caption_is_refused(editor: DatasetEditor, dataset: Path) -> None:
    assert editor.select_clip(dataset / "b.mp4")
    editor.caption_edit.setPlainText("   ")
    assert not editor.save_caption()
    assert (dataset / "b.txt").read_text(encoding="utf-8") == "clip b\n"
    assert "cannot be empty" in editor.note_label.text()


def test_filters_show_clips_without_captions_or_with_problems(editor: DatasetEditor, dataset: Path) -> None:
    names = lambda: sorted(p.name for p in editor.shown_paths())  # noqa: E731
    assert names() == ["a.mp4", "b.mp4", "broken.mp4", "nocaption.mp4", "still.png"]
    editor.no_caption_box.setChecked(True)
    assert names() == ["nocaption.mp4"]
    editor.no_caption_box.setChecked(False)
    editor.problems_box.setChecked(True)
    assert names() == ["nocaption.mp4"], "before the doctor has probed, only discovery's problems are known"
    from core.data.doctor import diagnose

    report = diagnose(editor.state.config)
    editor.set_report(editor.state.config, report)
    assert names() == ["broken.mp4", "nocaption.mp4"]
    editor.no_caption_box.setChecked(True)
    assert names() == ["broken.mp4", "nocaption.mp4"], "either filter lets a clip through"
    assert editor.count_label.text() == "2 of 5"
    # The doctor's facts reach the cells: duration, size and bucket.
    editor.problems_box.setChecked(False)
    editor.no_caption_box.setChecked(False)
    row = editor.model.row_of(dataset / "a.mp4")
    text = editor.model.index(row).data()
    assert "1.0 s" in text and "96x64" in text and "->" in text
    broken = editor.model.entries[editor.model.row_of(dataset / "broken.mp4")]
    assert broken.fatal and broken.problems


def test_the_folders_options_are_edited_in_the_config(editor: DatasetEditor) -> None:
    prefix = editor.options.widgets["caption_prefix"]
    assert isinstance(prefix, QLineEdit)
    prefix.setText("ohwx")
    prefix.editingFinished.emit()
    editor.options.widgets["caption_dropout"].setValue(0.1)
    editor.options.widgets["loss_weight"].setValue(2.0)
    editor.options.widgets["repeats"].setValue(3)
    dataset = editor.state.config["datasets"][0]
    assert (dataset["caption_prefix"], dataset["caption_dropout"], dataset["loss_weight"], dataset["repeats"]) == ("ohwx", 0.1, 2.0, 3)
    assert not editor.state.problems()


def test_thumbnails_arrive_in_the_background_and_are_cached(qtbot, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = thumbnails_module.first_frame

    def recording(path):
        threads.append(threading.current_thread())
        return real(path)

    monkeypatch.setattr(thumbnails_module, "first_frame", recording)
    widget = DatasetEditor(_state(dataset))
    qtbot.addWidget(widget)
    assert not widget.job.is_busy() and widget.model.rowCount() == 0, "nothing is listed for a hidden editor"
    widget.show()
    assert widget.job.wait()
    assert widget.model.rowCount() == 5
    # Listed at once; the thumbnails come later, from the pool.
    qtbot.waitUntil(lambda: len(widget.model.thumbnails) == 4, timeout=30_000)  # the broken clip has none
    assert threads and all(t is not threading.main_thread() for t in threads)
    image = widget.model.index(widget.model.row_of(dataset / "a.mp4")).data(Qt.ItemDataRole.DecorationRole)
    assert (image.width(), image.height()) == (96, 64), "small clips are not scaled up"
    assert (widget.model.index(widget.model.row_of(dataset / "broken.mp4")).data(Qt.ItemDataRole.DecorationRole)
            == widget.model.placeholder)
    made = len(threads)
    widget.shutdown()
    # A second editor reads them from the cache: nothing is decoded again.
    again = DatasetEditor(_state(dataset))
    qtbot.addWidget(again)
    again.show()
    assert again.settle()
    assert len(again.model.thumbnails) == 4
    assert len(threads) == made + 1, "only the broken clip is tried again"
    # A file changed on disk gets a new thumbnail.
    os.utime(dataset / "a.mp4", ns=(1, 1))
    again.reload()
    assert again.settle()
    assert len(threads) == made + 3
    again.shutdown()


def _mime(paths: list[Path]) -> QMimeData:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    return mime


def test_folders_dropped_on_the_data_tab_are_added(qtbot, dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    make_clip(other / "x.mp4", fps=16, seconds=1.0)
    (other / "x.txt").write_text("x", encoding="utf-8")
    window = MainWindow(remember=False)
    qtbot.addWidget(window)
    window.state.replace({**copy.deepcopy(load_preset(PRESET)), "datasets": [{"path": str(dataset), "repeats": 1}]})
    window.show()
    try:
        _drop_folders(window, dataset, other, tmp_path)
    finally:
        window.state.mark_saved()  # closing must not ask about unsaved settings, whatever failed
        window.close()


def _drop_folders(window: MainWindow, dataset: Path, other: Path, tmp_path: Path) -> None:
    assert window.select_tab("data")
    page = window.tabs.currentWidget()
    assert page.acceptDrops()
    # Qt delivers drag and drop events only during a real drag, so the tab's filter is given them.
    drops = window.folder_drops
    point, copy_action = QPointF(QPoint(20, 20)), Qt.DropAction.CopyAction
    buttons, keys = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    files_only = _mime([other / "x.mp4"])
    enter = QDragEnterEvent(QPoint(20, 20), copy_action, files_only, buttons, keys)
    drops.eventFilter(page, enter)
    assert not enter.isAccepted(), "a drag of files only is refused at once"
    folders = _mime([dataset, other, tmp_path / "not-there", other / "x.mp4"])
    enter = QDragEnterEvent(QPoint(20, 20), copy_action, folders, buttons, keys)
    drops.eventFilter(page, enter)
    assert enter.isAccepted()
    drop = QDropEvent(point, copy_action, folders, buttons, keys)
    drops.eventFilter(page, drop)
    assert drop.isAccepted()
    paths = [d["path"] for d in window.config["datasets"]]
    assert paths == [str(dataset), str(other)], "a folder already there, a missing one and a file are not added"
    editor = window.dataset_editor
    assert editor.folder == str(other)
    assert editor.settle()
    assert [p.name for p in editor.shown_paths()] == ["x.mp4"]
    # The table of folders above shows the dropped one too.
    table = window.forms["data"].fields["datasets"].editor
    assert table.rowCount() == 2
