"""The processes tests/test_faults_backups.py starts beside itself: a training run that waits after
a step until the test lets it go on, and processes that only hold a workspace lock (one of them
with a forked child that outlives it, as a data-loading worker of a killed run would). Imported by
a forkserver, so a run starts without re-importing torch."""

from __future__ import annotations

import os
import time
from typing import Any

WAIT = 120.0  # seconds a child waits for the test at most, so none is left behind if the test dies


def train_waiting(config: dict[str, Any], at_step: int, reached: Any, go_on: Any) -> None:
    """Train; after step `at_step` set `reached`, and wait for `go_on` before the next step."""
    import logging

    import torch

    from core.train.events import TrainerCallbacks
    from core.train.trainer import Trainer

    torch.set_num_threads(1)
    logging.disable(logging.INFO)

    class Wait(TrainerCallbacks):
        def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float) -> None:
            if step == at_step:
                reached.set()
                go_on.wait(WAIT)

    Trainer(config, Wait()).run()


def hold_lock(workspace: str, held: Any, fork_child: bool, child_pid: Any) -> None:
    """Take the workspace lock, optionally fork a child that sleeps on, set `held`, and wait to be
    killed."""
    from core.train.workspace_lock import WorkspaceLock

    WorkspaceLock(workspace).acquire()
    if fork_child:
        pid = os.fork()
        if pid == 0:
            time.sleep(WAIT)
            os._exit(0)
        child_pid.value = pid
    held.set()
    time.sleep(WAIT)
