"""The samples beside the Sampling tab: listed newest first from workspace_dir/samples, decoded off the
GUI thread, looping at the file's frame rate, and new ones from the engine's on_sample played at once."""

from __future__ import annotations

import os
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QPoint, QRect
from PySide6.QtWidgets import QApplication, QMessageBox

from core.config import load_preset
from gui import video_player
from gui.main_window import MainWindow
from gui.sample_viewer import SampleViewer, describe, list_samples, samples_folder
from gui.train_worker import RunOutcome, TrainThread, _Relay

PRESET = "#demo tiny wan LoRA"


def write_sample(path: Path, *, frames: int = 6, fps: int = 8, size: tuple[int, int] = (64, 48)) -> Path:
    """An H.264 mp4 (PyAV, libx264) whose frame k is a flat grey of level 40 k: easy to tell apart."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            image = np.full((height, width, 3), (40 * k) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def config_with_workspace(workspace: Path) -> dict:
    config = load_preset(PRESET)
    config["workspace_dir"] = str(workspace)
    return config


@pytest.fixture
def decode_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    original = video_player.decode_for_display

    def recording(path, control):
        seen.append(threading.get_ident())
        return original(path, control)

    monkeypatch.setattr(video_player, "decode_for_display", recording)
    return seen


@pytest.fixture
def window(qtbot, tmp_path: Path, decode_threads: list[int]) -> MainWindow:
    win = MainWindow()
    qtbot.addWidget(win)
    win.state.replace(config_with_workspace(tmp_path / "workspace"))
    win.show()
    return win


def test_lists_the_workspace_samples_newest_first_and_plays_the_newest(window: MainWindow, tmp_path: Path, qtbot, decode_threads: list[int]) -> None:
    folder = tmp_path / "workspace" / "samples"
    old = write_sample(folder / "step-000100-0-a-red-ball.mp4")
    new = write_sample(folder / "step-000200-0-a-red-ball.mp4", frames=5, fps=10)
    os.utime(old, (time.time() - 60, time.time() - 60))
    (folder / ".step-000300-0-x.mp4.abc.tmp").write_bytes(b"half written")
    (folder / "notes.txt").write_text("not a sample", encoding="utf-8")

    window.select_tab("sampling")  # the folder is read when the tab opens
    viewer = window.sample_viewer
    assert [viewer.list.item(i).text() for i in range(viewer.list.count())] == [describe(new), describe(old)]
    assert describe(new) == "step 200  ·  #0  ·  a red ball"
    assert viewer.settle()
    player = viewer.player
    assert player.video is not None and player.video.path == new
    assert len(player.video.frames) == 5 and player.video.fps == pytest.approx(10)
    assert decode_threads and threading.get_ident() not in decode_threads  # decoded off the GUI thread
    assert player.pixmap() is not None and not player.pixmap().isNull()
    assert player.timer.isActive() and player.timer.interval() == 100  # the file's 10 fps
    first = player.index
    qtbot.waitUntil(lambda: player.index != first, timeout=2000)  # it plays, and loops
    seen = set()
    qtbot.waitUntil(lambda: seen.add(player.index) or len(seen) == 5, timeout=3000)

    viewer.list.setCurrentRow(1)  # the older one
    assert viewer.settle() and player.video.path == old and not viewer.follow_newest


def test_a_sample_from_the_engine_plays_as_it_is_written(window: MainWindow, tmp_path: Path, qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's on_sample (through TrainThread's relay, on the run's thread) reaches the viewer."""
    written: list[Path] = []

    class SamplingRun(TrainThread):
        def run(self) -> None:  # the engine's part: write a sample, call on_sample, end
            relay = _Relay(self)
            path = Path(self.config["workspace_dir"]) / "samples" / "step-000002-0-a-cat.mp4"
            written.append(write_sample(path, frames=4))
            relay.on_sample(path)
            self.outcome.emit(RunOutcome(steps=2, total_steps=2))

    monkeypatch.setattr("gui.run_panel.TrainThread", SamplingRun)
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: pytest.fail(f"unexpected dialog {a[2]}"))
    window.select_tab("sampling")
    viewer = window.sample_viewer
    assert viewer.list.count() == 0 and "No sample yet" in viewer.player.text()

    with qtbot.waitSignal(window.run_panel.run_finished, timeout=20_000):
        assert window.run_panel.start()
    qtbot.waitUntil(lambda: viewer.list.count() == 1, timeout=5000)
    assert window.run_panel.last_thread.engine_calls["on_sample"] != {threading.get_ident()}
    assert viewer.settle()
    assert viewer.selected_path() == written[0] and viewer.player.video.path == written[0]
    assert len(viewer.player.video.frames) == 4


def test_new_samples_go_on_top_and_are_followed_only_from_the_newest(qtbot, tmp_path: Path) -> None:
    from gui.config_state import ConfigState

    state = ConfigState()
    state.replace(config_with_workspace(tmp_path / "ws"))
    viewer = SampleViewer(state)
    qtbot.addWidget(viewer)
    viewer.show()
    folder = samples_folder(state.config)
    first = write_sample(folder / "step-000010-0-a.mp4")
    viewer.add_sample(first)
    assert viewer.settle() and viewer.player.video.path == first
    second = write_sample(folder / "step-000020-0-a.mp4")
    viewer.add_sample(str(second))
    assert viewer.settle() and viewer.player.video.path == second and viewer.list.count() == 2

    viewer.list.setCurrentRow(1)  # looking at an older one: a new sample is listed, not played
    assert viewer.settle() and viewer.player.video.path == first
    third = write_sample(folder / "step-000030-0-a.mp4")
    viewer.add_sample(third)
    assert viewer.list.count() == 3 and viewer.settle()
    assert viewer.player.video.path == first and viewer.selected_path() == first
    assert list_samples(folder)[0].name == third.name

    state.edit("workspace_dir", str(tmp_path / "elsewhere"))  # another workspace: its (empty) folder
    assert viewer.list.count() == 0 and "No sample yet" in viewer.player.text()
    viewer.shutdown()


def test_broken_sample_and_still_image(qtbot, tmp_path: Path) -> None:
    from PySide6.QtGui import QImage

    from gui.config_state import ConfigState

    state = ConfigState()
    state.replace(config_with_workspace(tmp_path / "ws"))
    viewer = SampleViewer(state)
    qtbot.addWidget(viewer)
    viewer.show()
    folder = samples_folder(state.config)
    broken = folder / "step-000001-0-broken.mp4"
    folder.mkdir(parents=True)
    broken.write_bytes(b"\x00" * 2048)
    viewer.add_sample(broken)
    assert viewer.settle()
    assert viewer.player.video is None and "cannot be played" in viewer.player.text()

    still = folder / "step-000002-0-still.png"
    image = QImage(40, 30, QImage.Format.Format_RGB888)
    image.fill(0x3366CC)
    assert image.save(str(still))
    viewer.add_sample(still)
    assert viewer.settle()
    assert viewer.player.video is not None and len(viewer.player.video.frames) == 1
    assert not viewer.player.timer.isActive() and not viewer.player.pixmap().isNull()
    viewer.shutdown()


def test_the_samples_panel_fits_the_default_window(window: MainWindow, tmp_path: Path) -> None:
    """At the default 1120x800, with a sample playing and a long list, nothing of the panel is cut off
    or scrolled away: the player, the list, the caption and the folder line all show whole."""
    from gui.main_window import DEFAULT_SIZE

    folder = tmp_path / "workspace" / "samples"
    for step in range(100, 1300, 100):
        write_sample(folder / f"step-{step:06d}-0-a-red-circle-moving-from-left-to-right.mp4", size=(256, 256))
    window.resize(*DEFAULT_SIZE)
    window.select_tab("sampling")
    viewer = window.sample_viewer
    assert viewer.settle()
    for _ in range(3):  # the layouts settle after the sample's size is known
        QApplication.processEvents()
    panel = viewer.rect()
    for widget in (viewer.player, viewer.list, viewer.caption, viewer.folder_label, viewer.open_button):
        assert widget.isVisible(), widget
        box = QRect(widget.mapTo(viewer, QPoint(0, 0)), widget.size())
        assert panel.contains(box), (widget, box, panel)
        # Drawn whole: not clipped by a scroll area's viewport or a splitter.
        assert widget.visibleRegion().boundingRect() == widget.rect(), (widget, widget.visibleRegion().boundingRect())
    assert viewer.player.height() > viewer.list.height()  # the video has most of the height
    assert "6 frames" in viewer.caption.text()
