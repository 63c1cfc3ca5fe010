"""Runs the window remembers: Continue after raising max_steps trains on to the new total with the
plot holding both parts, a relaunched window shows the workspace's plots and status, and samples
being made show as their own state on the progress bar."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QMessageBox

from core.train.metrics_reader import read_metrics
from gui.main_window import MainWindow
from gui.run_panel import RunPanel
from gui.sample_viewer import PATH_ROLE
from gui.train_worker import RunOutcome

DEMO = "#demo tiny wan LoRA"
RUN_TIMEOUT_MS = 180_000  # a run here takes seconds; the machine may be busy


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tmp_path_factory.mktemp("cache")
    finally:
        torch.set_num_threads(threads)


def open_window(qtbot, monkeypatch: pytest.MonkeyPatch, workspace: Path, cache: Path, **settings) -> MainWindow:
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: QMessageBox.StandardButton.Ok)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)
    win = MainWindow(remember=False)
    qtbot.addWidget(win)
    win.load(DEMO)
    edits = {
        "max_steps": 4, "warmup_steps": 0, "dataloader_threads": 0,
        "workspace_dir": str(workspace), "cache_dir": str(cache),
        "output_path": str(workspace.parent / "output" / "demo.safetensors"),
        "backup.every_n_steps": 2, "sampling.every_n_steps": 0, **settings,
    }
    for key, value in edits.items():
        assert win.state.edit(key, value), key
    win.state.mark_saved()
    win.show()
    win.run_area.build_plots()
    return win


def run_to_end(qtbot, win: MainWindow, start) -> RunOutcome:
    with qtbot.waitSignal(win.run_panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert start() is not False
    return blocker.args[0]


def test_continue_after_raising_max_steps_and_a_relaunch_keep_the_whole_history(
        qtbot, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_cache: Path) -> None:
    workspace = tmp_path / "workspace"
    win = open_window(qtbot, monkeypatch, workspace, shared_cache)
    panel, plots = win.run_panel, win.plots
    first = run_to_end(qtbot, win, panel.start_button.click)
    assert first.error is None and (first.steps, first.total_steps, first.stopped_early) == (4, 4, False)
    assert plots.point_count("loss") == 4

    assert win.state.edit("max_steps", 6)
    assert panel.continue_button.isEnabled()
    again = run_to_end(qtbot, win, panel.continue_button.click)
    assert again.error is None and (again.steps, again.total_steps) == (6, 6)
    log_text = panel.log_view.toPlainText()
    assert "continuing from the backup of step 4" in log_text
    assert "extended from 4 to 6 steps and continues at step 4: the CONSTANT learning rate goes on as it was" in log_text
    # Both parts on the plot: the first run's steps and the continued ones, once each.
    qtbot.waitUntil(lambda: plots.drawn_count("loss") == 6, timeout=RUN_TIMEOUT_MS)
    xs, _ = plots.curve_item("loss").getData()
    assert list(xs) == [1, 2, 3, 4, 5, 6]
    records = read_metrics(workspace)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # The final loss shown is the smoothed one, as during the run.
    smoothed = records[-1]["loss_smoothed"]
    assert again.final_loss == smoothed
    assert panel.status_label.text() == f"Finished 6 of 6 steps, final loss {smoothed:.4f}."

    # A relaunch on the same workspace: the plots and the status come back from its files.
    relaunched = open_window(qtbot, monkeypatch, workspace, shared_cache, max_steps=6)
    qtbot.waitUntil(lambda: relaunched.plots.drawn_count("loss") == 6, timeout=RUN_TIMEOUT_MS)
    xs, ys = relaunched.plots.curve_item("loss").getData()
    assert list(xs) == [1, 2, 3, 4, 5, 6] and list(ys) == [r["loss"] for r in records]
    assert relaunched.plots.point_count("lr") == 6
    status = relaunched.run_panel.status_label.text()
    assert status.startswith(f"Finished: 6 of 6 steps, final loss {smoothed:.4f}."), status
    assert relaunched.run_panel.progress.value() == 6 and relaunched.run_panel.progress.maximum() == 6
    assert relaunched.run_panel.continue_button.isEnabled()


def test_a_stopped_run_is_told_after_a_relaunch(qtbot, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The status of a workspace whose run stopped before its end (here written as a run leaves it)."""
    import json

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    lines = [{"step": s, "loss": 0.5, "loss_smoothed": 0.25, "lr": 1e-3} for s in (1, 2, 3)]
    (workspace / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (workspace / "run_info.json").write_text(json.dumps({"total_steps": 200}))
    win = open_window(qtbot, monkeypatch, workspace, tmp_path / "cache")
    qtbot.waitUntil(lambda: win.plots.point_count("loss") == 3, timeout=RUN_TIMEOUT_MS)
    status = win.run_panel.status_label.text()
    assert status == "Stopped at step 3 of 200, final loss 0.2500; there is no backup to continue from.", status
    assert not win.run_panel.continue_button.isEnabled()
    # Another workspace_dir: its (empty) history replaces this one once the edits pause.
    assert win.state.edit("workspace_dir", str(tmp_path / "another"))
    qtbot.waitUntil(lambda: win.plots.point_count("loss") == 0, timeout=RUN_TIMEOUT_MS)
    assert win.run_panel.status_label.text() == "Ready." and win.run_panel.progress.format() == "not started"


def test_samples_being_made_show_as_their_own_state(qtbot, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     shared_cache: Path) -> None:
    seen: list[tuple[str, str]] = []
    original = RunPanel._on_sampling

    def record(self, step, done, count):
        original(self, step, done, count)
        seen.append((self.progress.format(), self.status_label.text()))

    monkeypatch.setattr(RunPanel, "_on_sampling", record)
    samples = tmp_path / "workspace" / "samples"
    samples.mkdir(parents=True)
    earlier = samples / "step-000100-0-an-earlier-run.mp4"
    earlier.write_bytes(b"an earlier run's sample")
    win = open_window(qtbot, monkeypatch, tmp_path / "workspace", shared_cache, max_steps=2,
                      **{"sampling.every_n_steps": 2, "sampling.inference_steps": 2})
    viewer = win.sample_viewer
    outcome = run_to_end(qtbot, win, win.run_panel.start)
    assert outcome.error is None and outcome.steps == 2
    assert seen[0] == ("sampling 1 / 1 after step 2", "Sampling: making video 1 of 1 after step 2 (training waits)...")
    assert seen[-1][0].startswith("step 2 / 2")  # the bar goes back to the steps
    made = list(samples.glob("step-000002-*.mp4"))
    assert made
    # The fresh Start kept the earlier run's sample aside; the list shows this run's only.
    assert [p.read_bytes() for p in samples.glob("earlier-*/*.mp4")] == [b"an earlier run's sample"]
    listed = [viewer.list.item(i).data(PATH_ROLE) for i in range(viewer.list.count())]
    assert listed == [str(p) for p in made]
    viewer.settle()
