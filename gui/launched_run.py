"""A run on several GPUs from the window: the engine under `accelerate launch` as child processes.

With distributed.processes above 1, Start runs `accelerate launch --multi_gpu --num_processes N
main.py train --config FILE --commands-dir FOLDER` (docs/training.md, "Several GPUs"), as a user
would from a terminal. The window shows the main process's run: its log lines (the child's output),
its metrics as metrics.jsonl receives them (loss, learning rate, memory), the progress from them and
run_info.json's total_steps. Stop, Sample now and Backup now create files in the commands folder
(core.train.events.FolderCommands), which the main process reads between steps; Continue launches
again with --resume. LaunchedTrainThread has TrainThread's signals, so the run panel treats the two
alike.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.atomic import write_bytes_atomic
from core.config.files import write_config_file
from core.train.events import FolderCommands

from .train_worker import RunError, RunOutcome, TrainThread

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.25  # how often metrics.jsonl is read while the run goes on
_CLOSING = re.compile(r"^(finished|stopped early)(?: \(continued from step \d+\))?: (\d+) of (\d+) steps(?:, final loss ([-\d.e+]+|nan|inf))?")
_PROGRESS_BAR = re.compile(r"\d+/\d+ \[|step/s|it/s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LaunchedTrainThread(TrainThread):
    """One run of distributed.processes processes, started and watched from this thread."""

    def __init__(self, config: dict[str, Any], parent: Any = None, *, resume: bool = False) -> None:
        super().__init__(config, parent, resume=resume)
        self._folder = Path(tempfile.mkdtemp(prefix="video-trainer-launch-"))
        self._commands = self._folder / "commands"
        self._commands.mkdir()
        self.process: subprocess.Popen | None = None

    # Requests from the window: files the main process finds between steps.
    def _ask(self, name: str) -> None:
        write_bytes_atomic(self._commands / name, b"")

    def request_stop(self) -> None:
        self._ask(FolderCommands.STOP)

    def request_sample(self, request: Any = None) -> None:
        if request is not None:  # the sample window's own prompt and sizes do not travel as a file
            self.log_line.emit(logging.WARNING, "a sample with its own prompt cannot be asked of a run on several "
                               "processes; Sample now samples sampling.prompts")
            return
        self._ask(FolderCommands.SAMPLE)

    def request_backup(self) -> None:
        self._ask(FolderCommands.BACKUP)

    def command(self) -> list[str]:
        config_file = write_config_file(self._folder / "config.json", self.config)
        processes = int(self.config["distributed"]["processes"])
        args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), str(ROOT / "main.py"), "train", "--config", str(config_file),
                "--commands-dir", str(self._commands)]  # fmt: skip
        return args + (["--resume"] if self.resume else [])

    def run(self) -> None:
        outcome = RunOutcome()
        try:
            self._download_model()
            self._report_device()
            self.record_call("launch")
            outcome = self._launch()
        except Exception as e:  # the boundary of the thread: a bug here, logged in full
            log.exception("the launched run failed unexpectedly")
            outcome.error = RunError(f"{type(e).__name__}: {e}", bug=True)
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)
        self.outcome.emit(outcome)

    def _launch(self) -> RunOutcome:
        workspace = Path(self.config["workspace_dir"]).expanduser()
        started = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, errors="replace")
        lines: list[str] = []
        reader = threading.Thread(target=self._read_output, args=(self.process, lines), daemon=True)
        reader.start()
        tail = _MetricsTail(workspace, started)
        while self.process.poll() is None:
            self._emit_metrics(tail)
            time.sleep(POLL_S)
        reader.join(timeout=10)
        self._emit_metrics(tail)
        return self._outcome(self.process.returncode, lines, tail)

    def _read_output(self, process: subprocess.Popen, lines: list[str]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                line = line.strip()
                if not line or _PROGRESS_BAR.search(line):
                    continue  # the progress bar: the window has its own, from the metrics
                lines.append(line)
                level = logging.ERROR if line.startswith("error:") else logging.WARNING if line.startswith("warning:") else logging.INFO
                self.log_line.emit(level, line.removeprefix("error: ").removeprefix("warning: "))

    def _emit_metrics(self, tail: _MetricsTail) -> None:
        for record in tail.new_records():
            self.record_call("on_metrics")
            self.metrics.emit(record)
            self.progress.emit(int(record["step"]), tail.total_steps or 0, int(record.get("epoch") or 0), None)

    def _outcome(self, code: int, lines: list[str], tail: _MetricsTail) -> RunOutcome:
        outcome = RunOutcome(steps=tail.last_step, total_steps=tail.total_steps or 0)
        closing = next((m for m in map(_CLOSING.match, reversed(lines)) if m), None)
        if code == 0 and closing is not None:
            outcome.stopped_early = closing.group(1) == "stopped early"
            outcome.steps, outcome.total_steps = int(closing.group(2)), int(closing.group(3))
            outcome.final_loss = float(closing.group(4)) if closing.group(4) else None
            outcome.output_paths = [line.removeprefix("saved ") for line in lines if line.startswith("saved ")]
            self.done.emit(list(outcome.output_paths))
            return outcome
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        # The engine's exit 2 is a user error (one line); anything else a failure of the launch or a bug.
        message = errors[0] if errors else f"the launched run ended with exit code {code}"
        outcome.error = RunError(message, "\n".join(lines[-40:]), bug=code != 2)
        return outcome


class _MetricsTail:
    """The records the main process appends to workspace/metrics.jsonl, from the run's start: the
    file is read once run_info.json of this run exists (an earlier run's files are set aside before)."""

    def __init__(self, workspace: Path, started: float) -> None:
        self.metrics, self.info = workspace / "metrics.jsonl", workspace / "run_info.json"
        self.started = started
        self.total_steps: int | None = None
        self.last_step = 0
        self._offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        if self.total_steps is None:
            try:
                if self.info.stat().st_mtime < self.started - 1:
                    return []  # an earlier run's
                info = json.loads(self.info.read_text(encoding="utf-8"))
                self.total_steps = int(info["total_steps"])
                # Continued: the window shows the steps from the backup on, as an in-process run does.
                self.last_step = int(info.get("resumed_from_step") or 0)
            except (OSError, ValueError, KeyError):
                return []
        try:
            with open(self.metrics, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete)
        records = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) > self.last_step:  # a resumed run's file starts with the earlier steps
                self.last_step = int(record["step"])
                records.append(record)
        return records
