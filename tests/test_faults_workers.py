"""The data-loading worker processes end with their run, however the run ends: killed with SIGKILL
(the CLI process gone at once), interrupted with Ctrl+C, finished normally, ended by an exception,
or stopped on a thread of a process that lives on (the window). See core/data/workers.py for why a
worker outlived a killed run before.

Runs use dataloader_threads 2, the setting that starts two worker processes; the steps of the tiny
model are slower than the workers' loading, so each worker has batches queued when the run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from engine_runs import Outcome, Runs, _Recorder, _reset_accelerate

from core.train.events import TrainerCommands
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
# Generous bounds on how long things may take on a loaded 2-core machine: these are deadlines for a
# wait, not measurements of speed. A worker ends within core.data.workers.WATCH_INTERVAL_S (0.5 s)
# of its run's death once scheduled; before the fix it never ended.
START_DEADLINE_S = 240.0
END_DEADLINE_S = 60.0


def _alive(process: psutil.Process) -> bool:
    """Running, not merely a zombie waiting for whoever adopted it to reap it."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until_gone(processes: list[psutil.Process], deadline_s: float) -> list[psutil.Process]:
    """The processes still alive after waiting up to deadline_s for all of them to end."""
    end = time.monotonic() + deadline_s
    alive = [p for p in processes if _alive(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.2)
        alive = [p for p in alive if _alive(p)]
    return alive


def _kill(processes: list[psutil.Process]) -> None:
    """Clean up what this test started, by pid, if the assertion failed."""
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _config(runs: Runs, name: str, **changes: object) -> dict:
    return runs.config({"dataloader_threads": WORKERS, **changes}, name=name)


def _start_run(runs: Runs, tmp_path: Path, name: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A run far longer than the test, started as a user would (in its own session, as a terminal's
    foreground job), once it is stepping: the process and its worker processes."""
    config = _config(runs, name, max_steps=100_000)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    trainer = subprocess.Popen([sys.executable, "main.py", "train", "--config", str(path)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    main = psutil.Process(trainer.pid)
    workers: list[psutil.Process] = []
    metrics = Path(config["workspace_dir"]) / "metrics.jsonl"
    end = time.monotonic() + START_DEADLINE_S
    # A few steps done: the workers run and are ahead of the steps, their batches queued.
    while time.monotonic() < end and trainer.poll() is None:
        if metrics.is_file() and len(read_metrics(metrics)) >= 3:
            workers = main.children()
            if len(workers) >= WORKERS:
                break
        time.sleep(0.2)
    return trainer, workers


def _end(trainer: subprocess.Popen, workers: list[psutil.Process]) -> None:
    """Clean up what a test started, by pid, whatever the assertions said."""
    if trainer.poll() is None:
        trainer.kill()
        trainer.wait()
    trainer.stderr.close()
    _kill(workers)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_the_workers_of_a_killed_run_end(runs: Runs, tmp_path: Path) -> None:
    trainer, workers = _start_run(runs, tmp_path, "killed")
    try:
        assert trainer.poll() is None, f"the run ended by itself: {trainer.stderr.read()[-3000:]}"
        assert len(workers) == WORKERS, [w.cmdline() for w in workers]
        trainer.send_signal(signal.SIGKILL)
        assert trainer.wait(timeout=60) == -signal.SIGKILL
        left = _wait_until_gone(workers, END_DEADLINE_S)
        assert not left, f"{len(left)} of {WORKERS} worker processes outlived the killed run by {END_DEADLINE_S:.0f} s"
    finally:
        _end(trainer, workers)


@pytest.mark.skipif(sys.platform == "win32", reason="a process group's SIGINT is POSIX")
def test_ctrl_c_stops_the_run_once_and_its_workers_end(runs: Runs, tmp_path: Path) -> None:
    trainer, workers = _start_run(runs, tmp_path, "interrupted")
    try:
        assert trainer.poll() is None, f"the run ended by itself: {trainer.stderr.read()[-3000:]}"
        assert len(workers) == WORKERS, [w.cmdline() for w in workers]
        os.killpg(trainer.pid, signal.SIGINT)  # what Ctrl+C in a terminal does: the whole foreground group
        _, stderr = trainer.communicate(timeout=START_DEADLINE_S)
        assert trainer.returncode == 0, stderr[-3000:]
        # The run stopped after its step, said so once (not once more per worker), and saved.
        assert stderr.count("stopping after this step") == 1, stderr[-3000:]
        assert _wait_until_gone(workers, END_DEADLINE_S) == []
    finally:
        _end(trainer, workers)


def _new_children(before: set[int]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before and _alive(p)]


class _Planted(RuntimeError):
    pass


class _FailAtStep(_Recorder):
    """Raises from the engine's callback after step `step`: an unexpected error inside the steps."""

    def __init__(self, outcome: Outcome, step: int) -> None:
        super().__init__(outcome)
        self.step = step

    def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float | None) -> None:
        if step == self.step:
            raise _Planted(f"planted failure after step {step}")


def test_no_worker_outlives_a_finished_run(runs: Runs) -> None:
    config = _config(runs, "finished", max_steps=4)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    _reset_accelerate()
    result = Trainer(config, _Recorder(Outcome(config))).run()
    assert result.steps == 4
    # The run's result is still held here, as a client holds it: the workers must be gone anyway.
    assert _new_children(before) == []


def test_no_worker_outlives_a_run_that_raised(runs: Runs) -> None:
    config = _config(runs, "raised", max_steps=6)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    _reset_accelerate()
    with pytest.raises(_Planted) as raised:
        Trainer(config, _FailAtStep(Outcome(config), 2)).run()
    # The exception, and with it its traceback and every frame of the run, is still held (as the
    # window holds it for its error dialog): the workers must be gone anyway.
    assert raised.value.__traceback__ is not None
    assert _new_children(before) == []


class _StopAtStep(_Recorder):
    """The window's Stop after step `step`; notes the new child processes when the run reports done."""

    def __init__(self, outcome: Outcome, commands: TrainerCommands, step: int, before: set[int]) -> None:
        super().__init__(outcome)
        self.commands, self.step, self.before = commands, step, before
        self.left_at_done: list[psutil.Process] | None = None

    def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float | None) -> None:
        if step == self.step:
            self.commands.request_stop()

    def on_done(self, output_paths: object) -> None:
        self.left_at_done = _new_children(self.before)


def test_no_worker_outlives_a_run_stopped_on_its_thread(runs: Runs) -> None:
    # As in the window: the engine on a thread of a process that lives on, stopped from outside.
    config = _config(runs, "stopped", max_steps=50)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    commands = TrainerCommands()
    callbacks = _StopAtStep(Outcome(config), commands, 2, before)
    results: list[object] = []
    _reset_accelerate()
    engine = threading.Thread(target=lambda: results.append(Trainer(config, callbacks, commands).run()))
    engine.start()
    engine.join(START_DEADLINE_S)
    assert not engine.is_alive() and results and results[0].steps == 2
    # Gone already when the run reported done, while its thread still ran (the kernel's
    # parent-death signal, which follows the thread, had not fired yet): the run shut them down.
    assert callbacks.left_at_done == []
    assert _new_children(before) == []
