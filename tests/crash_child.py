"""The process tests/test_crash_safety.py kills: one training run, optionally set to kill itself
(SIGKILL) inside the n-th os.fsync call, i.e. with a file's bytes written but not yet renamed into
place (in a backup or in a save). Imported by the forkserver, so a run starts without re-importing
torch and diffusers."""

from __future__ import annotations

import os
import signal
from typing import Any


def kill_inside_fsync(n: int) -> None:
    real = os.fsync
    calls = {"count": 0}

    def fsync(fd: int) -> None:
        calls["count"] += 1
        if calls["count"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real(fd)

    os.fsync = fsync


def kill_inside_backup(step: int) -> None:
    """Die after the first file of the backup of `step` is written into its temporary folder."""
    import core.train.backup as backup

    real = backup.sync_file

    def sync(path: Any) -> None:
        real(path)
        if path.parent.name.startswith(f".step-{step:08d}."):
            os.kill(os.getpid(), signal.SIGKILL)

    backup.sync_file = sync


def train(config: dict[str, Any], resume: bool, fsync_kill: int | None, backup_kill: int | None = None) -> None:
    import logging

    import torch

    torch.set_num_threads(1)  # two of these may run beside the test process on a 2-core machine
    logging.disable(logging.INFO)
    if fsync_kill is not None:
        kill_inside_fsync(fsync_kill)
    if backup_kill is not None:
        kill_inside_backup(backup_kill)
    from core.train.trainer import Trainer

    Trainer(config, resume=resume).run()
