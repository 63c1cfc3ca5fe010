"""The window with distributed.processes 2: Start runs the engine under `accelerate launch` as two
child processes (gui/launched_run.py), the plots and the progress follow the main process's metrics,
Stop ends the run cleanly (a backup of the last step and the result saved), and Continue picks it
up with --resume. Two CPU processes over gloo stand for two GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_ddp import _gloo_starts
from test_gui_run import RUN_TIMEOUT_MS, shared_cache, slot_threads, window  # noqa: F401 - fixtures used by name

from core.train.backup import BackupFolder
from gui.launched_run import LaunchedTrainThread
from gui.main_window import MainWindow
from gui.train_worker import RunOutcome


def test_a_two_process_run_from_the_window_plots_live_and_stops_cleanly(qtbot, window: MainWindow,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)  # the child processes: CPU and gloo, one thread each
    panel, plots = window.run_panel, window.plots
    assert window.state.edit("distributed.processes", 2) and window.state.edit("max_steps", 200)
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert panel.start() is not False
        thread = panel.thread
        assert isinstance(thread, LaunchedTrainThread)
        qtbot.waitUntil(lambda: plots.drawn_count("loss") >= 2 or not panel.is_running(), timeout=RUN_TIMEOUT_MS)
        assert panel.is_running(), panel.log_view.toPlainText()[-3000:]
        assert panel.progress.maximum() == 200 and panel.progress.value() >= 2  # live, from the main process
        panel.stop()
    outcome: RunOutcome = blocker.args[0]
    if outcome.error is not None and _gloo_starts():
        pytest.skip(_gloo_starts())
    assert outcome.error is None, (outcome.error, panel.log_view.toPlainText()[-3000:])
    assert outcome.stopped_early and 2 <= outcome.steps < 200
    assert thread.process is not None and thread.process.returncode == 0  # the launcher ended, with its processes
    assert plots.point_count("loss") == outcome.steps and plots.point_count("process_rss_bytes") == outcome.steps
    # The other process's memory: its own line (a GPU's allocated memory too, where there are GPUs).
    assert plots.point_count("process_rss_bytes_rank1") == outcome.steps
    assert plots.curve_item("process_rss_bytes_rank1").name() == "process RAM (RSS), process 1"
    workspace = Path(window.state.config["workspace_dir"])
    assert json.loads((workspace / "run_info.json").read_text(encoding="utf-8"))["world_size"] == 2
    assert BackupFolder(workspace).newest().step == outcome.steps  # Stop wrote a backup of the last step
    assert outcome.output_paths and Path(outcome.output_paths[0]).is_file()  # and saved
    assert not panel.is_running() and panel.continue_button.isEnabled()

    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        panel.continue_button.click()
        qtbot.waitUntil(lambda: panel.progress.value() > outcome.steps or not panel.is_running(), timeout=RUN_TIMEOUT_MS)
        panel.stop()
    again: RunOutcome = blocker.args[0]
    assert again.error is None and again.steps > outcome.steps, (again, panel.log_view.toPlainText()[-3000:])
    assert f"continuing from the backup of step {outcome.steps}" in panel.log_view.toPlainText()
