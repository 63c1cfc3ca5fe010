"""Tools > Sample: between runs it writes a video from the newest weights (made on a worker thread)
and plays it in the Sampling tab; during a run the request is queued to the trainer, which makes it
with the window's seed, size and frames after the current step."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QMessageBox

from core.export.video_file import read_video_frames
from core.train import samples as samples_module
from gui.main_window import MainWindow
from gui.tab_layout import TABS

DEMO = "#demo tiny wan LoRA"
TIMEOUT_MS = 180_000
FIELDS = {"seed": 5, "width": 32, "height": 48, "frames": 5, "inference_steps": 2}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tmp_path_factory.mktemp("cache")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def window(qtbot, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_cache: Path) -> Iterator[MainWindow]:
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)
    win = MainWindow(remember=False)
    qtbot.addWidget(win)
    win.load(DEMO)
    settings = {"max_steps": 2, "warmup_steps": 0, "dataloader_threads": 0, "learning_rate": 0.01,
                "workspace_dir": str(tmp_path / "workspace"), "cache_dir": str(shared_cache),
                "output_path": str(tmp_path / "output" / "demo.safetensors"), "sampling.every_n_steps": 0}
    for key, value in settings.items():
        assert win.state.edit(key, value), key
    win.state.mark_saved()
    win.show()
    yield win
    panel = win.run_panel
    if panel.is_running():
        panel.stop()
        qtbot.waitUntil(lambda: not panel.is_running(), timeout=TIMEOUT_MS)
    win.menus.close()


def _open_sample_window(win: MainWindow, prompt: str) -> object:
    win.menus.sample_action.trigger()
    dialog = win.menus.sample_window
    assert dialog is not None and dialog.isVisible()
    dialog.prompt.setPlainText(prompt)
    for key, value in FIELDS.items():
        dialog.numbers[key].setValue(value)
    return dialog


def test_between_runs_the_window_writes_a_video_that_decodes_and_plays_it(qtbot, window: MainWindow) -> None:
    with qtbot.waitSignal(window.run_panel.run_finished, timeout=TIMEOUT_MS):
        assert window.run_panel.start()
    dialog = _open_sample_window(window, "a red ball rolls")
    collecting: list[int] = []  # the thread of every garbage collection while the sample is made
    gc.callbacks.append(lambda phase, info: collecting.append(threading.get_ident()) if phase == "start" else None)
    try:
        dialog.make_button.click()
        assert not dialog.make_button.isEnabled()  # the worker is on it; the window goes on
        assert dialog.settle(TIMEOUT_MS)
    finally:
        gc.callbacks.pop()
    # None on the worker thread, where freeing a Qt object deadlocked this test once (gui/collector.py).
    assert collecting and set(collecting) == {threading.get_ident()}
    path = Path(window.config["workspace_dir"]) / "samples" / "step-000002-w1-a-red-ball-rolls.mp4"
    assert path.is_file(), dialog.status.text()
    assert read_video_frames(path).shape == (5, 48, 32, 3)
    assert "the LoRA of step 2" in dialog.status.text()
    assert window.tabs.currentIndex() == [spec.name for spec in TABS].index("sampling")
    assert window.sample_viewer.selected_path() == path  # listed first and playing
    assert dialog.make_button.isEnabled()


def test_a_problem_is_said_in_the_window(qtbot, window: MainWindow, tmp_path: Path) -> None:
    dialog = _open_sample_window(window, "   ")
    dialog.make_button.click()
    assert "Write a prompt first" in dialog.status.text() and not dialog.is_busy()
    missing = tmp_path / "no-model-here"
    assert window.state.edit("base_model", str(missing))
    dialog.prompt.setPlainText("a cat")
    dialog.make_button.click()
    assert dialog.settle(TIMEOUT_MS)
    assert str(missing) in dialog.status.text() and dialog.make_button.isEnabled()
    assert not (Path(window.config["workspace_dir"]) / "samples").exists()


def test_during_a_run_the_request_is_queued_with_the_windows_seed_and_frames(qtbot, window: MainWindow,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, object]] = []
    original = samples_module.SampleMaker.make

    def recording(self, step, denoisers, asked=None):
        if asked:
            seen.extend((threading.get_ident(), r) for r in asked)
        return original(self, step, denoisers, asked)

    monkeypatch.setattr(samples_module.SampleMaker, "make", recording)
    assert window.state.edit("max_steps", 400)
    panel = window.run_panel
    assert panel.start()
    with qtbot.waitSignal(panel.thread.progress, timeout=TIMEOUT_MS):
        pass  # the first step is done: training is under way
    dialog = _open_sample_window(window, "a queued cat")
    with qtbot.waitSignal(panel.thread.sample, timeout=TIMEOUT_MS) as written:
        dialog.make_button.click()
        assert "Queued" in dialog.status.text() and not dialog.is_busy()  # no worker of its own: the run makes it
    path = Path(written.args[0])
    assert path.name.endswith("-w1-a-queued-cat.mp4")
    assert read_video_frames(path).shape == (5, 48, 32, 3)
    (thread_id, request), = seen
    assert thread_id != threading.get_ident()  # made on the training thread
    assert (request.seed, request.frames, request.steps, request.prompt) == (5, 5, 2, "a queued cat")
    viewer = window.sample_viewer  # the run's samples arrive there as every sample does
    qtbot.waitUntil(lambda: viewer.list.count() > 0 and viewer.list.item(0).toolTip() == str(path), timeout=TIMEOUT_MS)
    with qtbot.waitSignal(panel.run_finished, timeout=TIMEOUT_MS):
        panel.stop()


def test_a_request_the_run_did_not_reach_is_said_in_the_log(qtbot, window: MainWindow, tmp_path: Path) -> None:
    from core.models.base import SampleRequest
    from gui.train_worker import TrainThread

    config = dict(window.config, base_model=str(tmp_path / "no-model"))  # the run ends before its first step
    thread = TrainThread(config)
    lines: list[str] = []
    thread.log_line.connect(lambda _level, line: lines.append(line))
    thread.request_sample(SampleRequest("late", width=32, height=32, frames=5, steps=2, guidance_scale=1.0, seed=1))
    with qtbot.waitSignal(thread.finished, timeout=TIMEOUT_MS):
        thread.start()
    qtbot.waitUntil(lambda: any("were not made" in line for line in lines), timeout=10_000)
