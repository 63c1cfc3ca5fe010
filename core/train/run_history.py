"""What a workspace says about its run, for a client that was not there (the window after a relaunch):
the metrics written so far, the planned length, and how far the run got.

Read only: metrics.jsonl (core.train.metrics_reader), run_info.json (written at the start of every
run, with its total_steps) and the backups' backup.json files. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backup import BackupFolder
from .metrics_reader import read_metrics
from .run_info import RUN_INFO_FILE_NAME


@dataclass
class RunHistory:
    """The workspace's run as its files tell it."""

    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in order
    total_steps: int | None = None  # the planned length of the latest run (run_info.json)
    backup_step: int | None = None  # the newest backup's step (Continue starts there)

    @property
    def steps(self) -> int:
        """The last step with a record (0 without any)."""
        return int(self.records[-1].get("step", 0)) if self.records else 0

    @property
    def final_loss(self) -> float | None:
        """The smoothed loss of the last step, as the run showed it (the raw one without)."""
        for record in reversed(self.records):
            for key in ("loss_smoothed", "loss"):
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return float(value)
        return None

    @property
    def finished(self) -> bool:
        return bool(self.records) and self.total_steps is not None and self.steps >= self.total_steps

    def status(self) -> str | None:
        """One line for the run panel, or None for a workspace without a run."""
        if not self.records:
            return None
        loss = f", final loss {self.final_loss:.4f}" if self.final_loss is not None else ""
        total = f" of {self.total_steps}" if self.total_steps else ""
        if self.finished:
            return f"Finished: {self.steps}{total} steps{loss}. Raise max_steps and press Continue to train further."
        if self.backup_step is not None:
            where = "there" if self.backup_step == self.steps else f"from the backup of step {self.backup_step}"
            return f"Stopped at step {self.steps}{total}{loss}. Continue goes on {where}."
        return f"Stopped at step {self.steps}{total}{loss}; there is no backup to continue from."


def read_history(workspace: str | os.PathLike) -> RunHistory:
    """The run in a workspace folder; an empty history for one without metrics (or not there)."""
    folder = Path(workspace).expanduser()
    history = RunHistory(records=read_metrics(folder))
    if not history.records:
        return history
    try:
        info = json.loads((folder / RUN_INFO_FILE_NAME).read_text(encoding="utf-8"))
        total = info.get("total_steps") if isinstance(info, dict) else None
        history.total_steps = int(total) if isinstance(total, int) else None
    except (OSError, ValueError):
        pass
    try:
        newest = BackupFolder(folder).newest()
    except OSError:
        newest = None
    history.backup_step = newest.step if newest is not None else None
    return history
