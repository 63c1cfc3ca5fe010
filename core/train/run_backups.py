"""A run's side of backups: which one to continue from, taking it back, writing one, and keeping an
earlier run's files when a run starts from the beginning (the folder itself: backup.py; what goes in
it: resume.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import UserError

from .backup import Backup, BackupFolder, stamp
from .events import TrainerCallbacks
from .loop import RunParts, TrainResult


def backup_to_resume(backups: BackupFolder) -> Backup:
    newest = backups.newest()
    if newest is None:
        raise UserError(f"there is no backup in {backups.root} to continue from; train without --resume to start "
                        "(backups are written every backup.every_n_steps steps and when a run is stopped)")
    return newest


def restore(run: RunParts, backup: Backup, result: TrainResult) -> None:
    """Put the run where the backup was: weights, optimizer, schedule, EMA, smoothing, validation
    watch; the RNG states are restored by the loop once its data iterator exists."""
    from .resume import load_trained, read_backup

    trained, state, ema_tensors = read_backup(backup)
    load_trained(run.parts.named_trainable(), trained, backup.path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        if ema_tensors is None:
            raise UserError(f"the backup {backup.path} has no EMA weights but ema.enabled is on; turn it off to continue")
        run.ema.load(ema_tensors, state["ema"])
    info = backup.info
    run.smoother.load_state_dict(info["smoother"])
    if run.plateau is not None and info.get("plateau"):
        run.plateau.load_state_dict(info["plateau"])
    run.rng_to_restore = state["rng"]
    result.steps = result.resumed_from = backup.step
    result.skipped_steps = int(info.get("skipped_steps", 0))


def backup_writer(run: RunParts, backups: BackupFolder, config: dict[str, Any], data: dict[str, Any],
                  result: TrainResult) -> Callable[[int, int, int], Path]:
    """write(step, batch step, epoch): a backup of the run as it is after that step."""
    from .resume import backup_filler, backup_info, rng_states
    from .run_info import app_version

    version = app_version()

    def write(step: int, batch_step: int, epoch: int) -> Path:
        state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": rng_states()}
        if run.ema is not None:
            state["ema"] = run.ema.state_dict()
        fill = backup_filler(run.parts.named_trainable(), state, run.ema.tensors() if run.ema is not None else None)
        extra = {"smoother": run.smoother.state_dict(), "skipped_steps": result.skipped_steps,
                 "total_steps": run.total_steps, "training_method": config["training_method"],
                 "plateau": run.plateau.state_dict() if run.plateau is not None else None}
        info = backup_info(step=step, batch_step=batch_step, epoch=epoch, config=config, data=data,
                           app_version=version, extra=extra)
        path = backups.write(step, fill, info)
        run.callbacks.on_log(logging.INFO, f"backup of step {step} written to {path}")
        return path

    return write


def set_earlier_runs_aside(workspace: Path, backups: BackupFolder, callbacks: TrainerCallbacks) -> None:
    """A run from the start keeps what earlier runs left in the workspace, under other names: their
    backups (which resume would otherwise pick up) and their metrics (whose steps would mix with
    this run's)."""
    moved = backups.set_aside()
    metrics = workspace / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        target = workspace / f"metrics-earlier-{stamp()}.jsonl"
        metrics.rename(target)
        moved.append(target)
    for path in moved:
        callbacks.on_log(logging.INFO, f"an earlier run's files were kept as {path}")
