"""The window's run side: Start trains the tiny model in a worker thread to the end with plots and
progress, Stop ends it cleanly, closing asks and waits, bad settings block Start, engine errors arrive
as a dialog, and no engine call runs on the GUI thread."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QMessageBox

from gui.main_window import MainWindow
from gui.run_panel import RunPanel, format_duration
from gui.train_worker import RunOutcome

DEMO = "#demo tiny wan LoRA"
RUN_TIMEOUT_MS = 180_000  # a run here takes 3-10 s; the machine may be busy
GUI_SLOTS = ("_on_progress", "_on_metrics", "_on_log", "_on_done", "_on_outcome", "_on_finished")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One latent cache for the module (the first run fills it), and one torch thread: the tiny
    model's operations are too small to share, and on two busy cores more threads are slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tmp_path_factory.mktemp("cache")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def slot_threads(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[int]]:
    """The thread of every call of the panel's slots for the run's signals (patched before the
    window exists, so the connections use the recording versions)."""
    seen: dict[str, set[int]] = {}
    for name in GUI_SLOTS:
        original = getattr(RunPanel, name)

        def record(self, *args, _name=name, _original=original):
            seen.setdefault(_name, set()).add(threading.get_ident())
            return _original(self, *args)

        monkeypatch.setattr(RunPanel, name, record)
    return seen


@pytest.fixture
def window(qtbot, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_cache: Path, slot_threads) -> Iterator[MainWindow]:
    """The window with the demo preset, writing into the test's folders, with short runs."""
    warnings: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: warnings.append(a[2]) or QMessageBox.StandardButton.Ok)
    monkeypatch.setattr(QMessageBox, "question", answer_yes_or_discard)
    win = MainWindow(remember=False)
    win.warnings = warnings  # type: ignore[attr-defined]
    qtbot.addWidget(win)
    win.load(DEMO)
    settings = {
        "max_steps": 4,
        "warmup_steps": 0,
        "dataloader_threads": 0,  # no worker processes: a short run does not pay their start
        "workspace_dir": str(tmp_path / "workspace"),
        "cache_dir": str(shared_cache),
        "output_path": str(tmp_path / "output" / "demo.safetensors"),
    }
    for key, value in settings.items():
        assert win.state.edit(key, value), key
    win.state.mark_saved()
    win.show()
    yield win
    panel = win.run_panel
    if panel.is_running():  # a failed test must not leave a thread behind
        panel.stop()
        qtbot.waitUntil(lambda: not panel.is_running(), timeout=RUN_TIMEOUT_MS)


def answer_yes_or_discard(_parent, _title, _text, buttons, *_args, **_kwargs) -> QMessageBox.StandardButton:
    """Stop the run when asked; discard unsaved changes (the test's edits) when closing."""
    if buttons & QMessageBox.StandardButton.Discard:
        return QMessageBox.StandardButton.Discard
    return QMessageBox.StandardButton.Yes


def run_to_end(qtbot, win: MainWindow, start=None) -> RunOutcome:
    with qtbot.waitSignal(win.run_panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert (start or win.run_panel.start)() is not False
    return blocker.args[0]


def action(win: MainWindow, text: str):
    return next(a for a in win.actions() if a.text() == text)


def test_start_trains_to_the_end_with_plots_progress_and_threads(qtbot, window: MainWindow, slot_threads, tmp_path: Path) -> None:
    panel, plots = window.run_panel, window.plots
    assert panel.start_button.isEnabled() and not panel.stop_button.isEnabled()
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        panel.start_button.click()
        assert panel.is_running() and not panel.start_button.isEnabled() and panel.stop_button.isEnabled()
    outcome: RunOutcome = blocker.args[0]

    assert outcome.error is None and (outcome.steps, outcome.total_steps, outcome.stopped_early) == (4, 4, False)
    assert panel.progress.maximum() == 4 and panel.progress.value() == 4  # 100%
    assert plots.point_count("loss") == 4 and plots.point_count("loss_smoothed") == 4
    assert plots.point_count("lr") == 4 and plots.point_count("process_rss_bytes") == 4
    qtbot.waitUntil(lambda: plots.drawn_count("loss") == 4 and plots.drawn_count("process_rss_bytes") == 4)
    assert plots.curve_item("cuda_allocated_bytes") is None  # no CUDA here: no GPU curves
    output = tmp_path / "output" / "demo.safetensors"
    assert outcome.output_paths == [str(output)] and output.is_file()
    assert str(output) in panel.output_label.text() and panel.output_label.isVisibleTo(panel)
    assert panel.status_label.text().startswith("Finished 4 of 4 steps")
    assert "captions:" in panel.log_view.toPlainText()  # the engine's on_log (the cache report)
    assert panel.start_button.isEnabled() and not panel.stop_button.isEnabled()

    # No engine work on the GUI thread; every slot on it.
    gui = threading.get_ident()
    thread = panel.last_thread
    assert thread is not None and thread.isFinished()
    calls = thread.engine_calls
    assert {"import", "Trainer", "Trainer.run", "on_progress", "on_metrics", "on_log", "on_done"} <= set(calls)
    assert all(idents and gui not in idents for idents in calls.values()), calls
    assert len(set().union(*calls.values())) == 1  # one worker thread did it all
    assert set(GUI_SLOTS) <= set(slot_threads) and all(idents == {gui} for idents in slot_threads.values())

    # A second Start in the same process (accelerate's state was released by the engine).
    assert window.state.edit("max_steps", 3)
    outcome = run_to_end(qtbot, window)
    assert outcome.error is None and outcome.steps == 3
    assert plots.point_count("loss") == 3  # the plots started over
    assert panel.progress.value() == panel.progress.maximum() == 3


def test_stop_mid_run_ends_cleanly(qtbot, window: MainWindow) -> None:
    panel = window.run_panel
    assert window.state.edit("max_steps", 200)
    assert action(window, "Start training").shortcuts()[0] == QKeySequence("Ctrl+Return")
    assert action(window, "Stop training").shortcuts()[0] == QKeySequence("Ctrl+.")
    done: list[list[str]] = []
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        action(window, "Start training").trigger()
        qtbot.waitUntil(lambda: panel.progress.value() >= 2, timeout=RUN_TIMEOUT_MS)
        panel.thread.done.connect(done.append)
        action(window, "Stop training").trigger()
        assert "Stopping" in panel.status_label.text() and not panel.stop_button.isEnabled()
    outcome: RunOutcome = blocker.args[0]

    assert outcome.error is None and outcome.stopped_early and 2 <= outcome.steps < 200
    assert done and done[0] == outcome.output_paths and Path(outcome.output_paths[0]).is_file()  # saved
    assert not panel.is_running() and panel.last_thread.isFinished()
    assert panel.status_label.text().startswith(f"Stopped after {outcome.steps} of 200 steps")
    assert panel.progress.value() == outcome.steps
    # Stopping wrote a backup of the last step; Continue picks the run up there.
    from core.train.backup import BackupFolder

    assert BackupFolder(window.state.config["workspace_dir"]).newest().step == outcome.steps
    assert panel.continue_button.isEnabled()
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        panel.continue_button.click()
        qtbot.waitUntil(lambda: panel.progress.value() > outcome.steps, timeout=RUN_TIMEOUT_MS)
        panel.stop()
    again: RunOutcome = blocker.args[0]
    assert again.error is None and again.steps > outcome.steps
    assert f"continuing from the backup of step {outcome.steps}" in panel.log_view.toPlainText()


def test_closing_during_a_run_asks_stops_and_closes(qtbot, window: MainWindow, monkeypatch: pytest.MonkeyPatch) -> None:
    panel = window.run_panel
    assert window.state.edit("max_steps", 200)
    window.state.mark_saved()
    asked: list[str] = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes)
    assert panel.start()
    qtbot.waitUntil(lambda: panel.progress.value() >= 1, timeout=RUN_TIMEOUT_MS)
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert window.close() is False  # not yet: the run stops first
        assert window.isVisible() and asked and "Training is running" in asked[0]
        assert window.close() is False  # a second close while stopping does not ask again
        assert len(asked) == 1
    assert blocker.args[0].stopped_early and blocker.args[0].output_paths
    qtbot.waitUntil(lambda: not window.isVisible())
    assert panel.last_thread.isFinished()


def test_bad_value_blocks_start_with_the_reason(qtbot, window: MainWindow) -> None:
    panel = window.run_panel
    rate = window.forms["training"].fields["learning_rate"].editor
    rate.clear()
    qtbot.keyClicks(rate, "abc")
    assert not panel.start_button.isEnabled()
    # Named by the field's label, as the user sees it on the tab, not by its key.
    assert "“Learning rate”" in panel.status_label.text() and "“Learning rate”" in panel.start_button.toolTip()
    assert panel.start() is False  # the shortcut's way in: refused with the reason
    assert not panel.is_running() and "“Learning rate”" in window.warnings[-1]
    rate.clear()
    qtbot.keyClicks(rate, "0.001")
    assert panel.start_button.isEnabled() and panel.status_label.text() == "Ready."


def test_engine_error_arrives_as_a_dialog_and_shows_the_setting(qtbot, window: MainWindow, tmp_path: Path) -> None:
    missing = tmp_path / "no such model"
    assert window.state.edit("base_model", str(missing))
    outcome = run_to_end(qtbot, window)
    assert outcome.error is not None and not outcome.error.bug and outcome.error.keys == ("base_model",)
    box = window.run_panel.error_box
    assert box is not None and box.isVisible()
    assert "does not exist" in box.text() and str(missing) in box.text() and "\n" not in box.text()
    assert "base_model" in box.detailedText()  # the details, behind "Show Details"
    assert window.run_panel.status_label.text().startswith("Failed: ")
    assert window.tabs.tabText(window.tabs.currentIndex()) == "General"  # where base_model is
    box.done(0)
    assert window.run_panel.error_box is None and window.run_panel.start_button.isEnabled()


def test_bug_in_the_engine_is_logged_and_shown_with_its_traceback(qtbot, window: MainWindow, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import core.train.trainer

    def broken_run(self):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(core.train.trainer.Trainer, "run", broken_run)
    with caplog.at_level(logging.ERROR):
        outcome = run_to_end(qtbot, window)
    assert outcome.error is not None and outcome.error.bug
    box = window.run_panel.error_box
    assert box.text() == "RuntimeError: boom" and box.icon() == QMessageBox.Icon.Critical
    assert "Traceback" in box.detailedText() and "broken_run" in box.detailedText()
    assert "log file" in box.informativeText()
    assert any(r.exc_info and "training failed" in r.getMessage() for r in caplog.records)
    box.done(0)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 0, 59.6, 61, 3725)] == ["?", "0:00", "1:00", "1:01", "1:02:05"]


def test_sample_and_backup_requests_reach_the_engine_commands(qtbot, window: MainWindow, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.train.events import TrainerCommands

    requests: list[str] = []
    monkeypatch.setattr(TrainerCommands, "request_sample", lambda self, request=None: requests.append("sample" if request is None else request))
    monkeypatch.setattr(TrainerCommands, "request_backup", lambda self: requests.append("backup"))
    panel = window.run_panel
    assert not panel.sample_button.isEnabled() and not panel.backup_button.isEnabled()
    assert window.state.edit("max_steps", 200)
    assert panel.start()
    panel.sample_button.click()
    panel.backup_button.click()
    assert requests == ["sample", "backup"]
    assert "Sample requested" in panel.log_view.toPlainText()
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS):
        panel.stop()
