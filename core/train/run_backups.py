"""A run's side of backups: which one to continue from, taking it back, writing one, and keeping an
earlier run's files when a run starts from the beginning (the folder itself: backup.py; what goes in
it: resume.py)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.atomic import explained_write_errors
from core.errors import FollowedError, UserError

from .backup import Backup, BackupFolder, stamp
from .events import TrainerCallbacks
from .loop import RunParts, TrainResult
from .samples import SAMPLES_DIR_NAME


def backup_to_resume(backups: BackupFolder, on_log: Callable[[int, str], None]) -> Backup:
    """The newest intact backup: its files are checked against the checksums written with them,
    newest first; a damaged one is skipped with a warning naming it."""
    found = backups.complete()
    if not found:
        raise UserError(f"there is no backup in {backups.root} to continue from; train without --resume to start "
                        "(backups are written every backup.every_n_steps steps and when a run is stopped)")
    for backup in reversed(found):
        problem = _damage(backup)
        if problem is None:
            return backup
        on_log(logging.WARNING, f"the backup {backup.path} is damaged ({problem}) and is skipped"
               + ("; trying the one before it" if backup is not found[0] else ""))
    raise UserError(f"no backup in {backups.root} is intact ({len(found)} damaged, see the warnings above); "
                    "train without --resume to start from the beginning")


def _damage(backup: Backup) -> str | None:
    from .backup import damage

    problem = damage(backup)
    if problem is not None or backup.info.get("format") != 1:
        return problem
    # Format 1 has no checksums: what can be checked is that its files load.
    from .resume import read_backup

    try:
        read_backup(backup)
    except Exception as e:  # noqa: BLE001 - any failure to load is damage, named in the warning
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"its files cannot be read: {type(e).__name__}: {first[:200]}"
    return None


def restore(run: RunParts, backup: Backup, result: TrainResult) -> None:
    """Put the run where the backup was: weights, optimizer, schedule, EMA, smoothing, validation
    watch; the RNG states are restored by the loop once its data iterator exists."""
    from .fsdp_backup import is_sharded, load_shards
    from .resume import load_trained, read_backup, read_state

    if is_sharded(backup.path):
        # An FSDP run's shards: each process takes its shard of each tensor (or, on one process, all
        # of it). FSDP trains one denoiser (fsdp_refusals).
        state, ema_tensors = read_state(backup), None
        load_shards(backup.path, run.parts.named_trainable(), run.routes.models[0], run.optimizer)
    else:
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
    from .resume import rng_for_process

    accelerator = run.accelerator
    run.rng_to_restore = rng_for_process(state, accelerator.process_index, accelerator.num_processes)
    result.steps = result.resumed_from = backup.step
    result.skipped_steps = int(info.get("skipped_steps", 0))


def backup_writer(run: RunParts, backups: BackupFolder, config: dict[str, Any], data: dict[str, Any],
                  result: TrainResult, *, together: bool = False, fsdp_model: Any = None) -> Callable[[int, int, int], Path | None]:
    """write(step, batch step, epoch): a backup of the run as it is after that step. together:
    every process calls it (several processes), each giving its RNG states, and the main process
    writes (None elsewhere); a backup that fails stops every process. With an fsdp_model (the trained
    denoiser of distributed.strategy FSDP, sharded or on one process) every process writes its shards
    of the trained weights and the optimizer state (fsdp_backup.py), which continue on any number of
    processes. Without together the main process writes alone (its own RNG states)."""
    is_main = run.accelerator.is_main_process
    from .resume import backup_info, rng_states
    from .run_info import app_version

    version = app_version()

    def write(step: int, batch_step: int, epoch: int) -> Path | None:
        rng, per_process = rng_states(), None
        if together:
            from accelerate.utils import gather_object

            per_process = gather_object([rng])  # every process's, in rank order
        state = {"scheduler": run.scheduler.state_dict(), "rng": rng}
        if per_process is not None:
            state["rng_by_process"] = per_process
        if run.ema is not None:
            state["ema"] = run.ema.state_dict()
        extra = {"smoother": run.smoother.state_dict(), "skipped_steps": result.skipped_steps,
                 "total_steps": run.total_steps, "training_method": config["training_method"],
                 "plateau": run.plateau.state_dict() if run.plateau is not None else None}
        info = backup_info(step=step, batch_step=batch_step, epoch=epoch, config=config, data=data,
                           app_version=version, extra=extra)
        try:
            if fsdp_model is not None:
                from .fsdp_backup import write_sharded_backup

                path = write_sharded_backup(run.accelerator, backups, step, run.parts.named_trainable(),
                                            fsdp_model, run.optimizer, state, info)
            elif together:
                path = _written_by_main(run.accelerator, step, lambda: _write_whole(run, backups, step, state, info))
            else:
                path = _write_whole(run, backups, step, state, info)
        except UserError as e:
            raise (_run_stopped(e, backups, step) if is_main else e) from e
        if path is not None:
            run.callbacks.on_log(logging.INFO, f"backup of step {step} written to {path}")
        return path

    return write


def _write_whole(run: RunParts, backups: BackupFolder, step: int, state: dict[str, Any], info: dict[str, Any]) -> Path:
    """The backup of an unsharded run, written by the main process (every process holds the weights)."""
    from .resume import backup_filler

    state = {"optimizer": run.optimizer.state_dict(), **state}
    return backups.write(step, backup_filler(run.parts.named_trainable(), state,
                                             run.ema.tensors() if run.ema is not None else None), info)


def _written_by_main(accelerator: Any, step: int, write: Callable[[], Path]) -> Path | None:
    """write() on the main process, its outcome told to every process: a failed backup raises its
    UserError on every process (the others' says what the main process's said), so that all of them
    stop rather than wait for one another at the next step."""
    from accelerate.utils import broadcast_object_list

    path, failure = None, None
    if accelerator.is_main_process:
        try:
            path = write()
        except UserError as e:
            failure = e
    told = [str(path) if path is not None else None, str(failure) if failure is not None else None]
    broadcast_object_list(told)
    if told[1] is not None:
        raise failure if failure is not None else FollowedError(f"the backup of step {step} was not written: {told[1]}")
    return path


def _run_stopped(error: UserError, backups: BackupFolder, step: int) -> UserError:
    """A backup that cannot be written stops the run: going on for hours without backups would put
    all of that at the mercy of the next crash, and the disk the backup could not be written to is
    often the output's too. The line says which backup is left to continue from."""
    # One of the same step would be a damaged one that this run's backup was to replace.
    kept = next((b for b in reversed(backups.complete()) if b.step < step), None)
    if kept is None:
        return UserError(f"{error}; the run stopped after step {step} without a backup")
    return UserError(f"{error}; the run stopped after step {step}: the backup of step {kept.step} is kept, continue "
                     "from it with --resume (the window: Continue) once the disk can be written")


def set_earlier_runs_aside(workspace: Path, backups: BackupFolder, callbacks: TrainerCallbacks) -> None:
    """A run from the start keeps what earlier runs left in the workspace, under other names: their
    backups (which resume would otherwise pick up), their metrics (whose steps would mix with
    this run's) and their samples (whose names, by step, this run's would replace)."""
    with explained_write_errors(backups.root, "the folder of an earlier run's backups", key="workspace_dir"):
        moved = backups.set_aside()
    metrics = workspace / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        target = workspace / f"metrics-earlier-{stamp()}.jsonl"
        with explained_write_errors(target, "an earlier run's metrics", key="workspace_dir"):
            metrics.rename(target)
        moved.append(target)
    moved.extend(_set_samples_aside(workspace / SAMPLES_DIR_NAME))
    for path in moved:
        callbacks.on_log(logging.INFO, f"an earlier run's files were kept as {path}")


def _set_samples_aside(folder: Path) -> list[Path]:
    """Move an earlier run's sample files into `samples/earlier-<time>/` (renames, one per file: the
    samples folder itself stays, so a window listing it keeps watching the same path)."""
    try:
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    except OSError:
        return []
    if not files:
        return []
    aside = folder / f"earlier-{stamp()}"
    with explained_write_errors(aside, "the folder of an earlier run's samples", key="workspace_dir"):
        aside.mkdir()
        for path in files:
            os.replace(path, aside / path.name)
    return [aside]


def backup_after_the_run(run: RunParts, backups: BackupFolder, data: dict[str, Any], result: TrainResult, sharded: bool) -> Any:
    """The backup writer for a failed final save, which the main process calls alone: DDP's main
    process holds everything; a sharded optimizer state cannot be gathered by one process."""
    if not sharded:
        return backup_writer(run, backups, run.config, data, result)

    def refuse(step: int, *_: Any) -> None:
        newest = backups.newest()
        kept = f"; the backup of step {newest.step} is kept" if newest is not None else ""
        raise UserError(f"with FSDP the sharded optimizer state of step {step} cannot be gathered after the run{kept}")

    return refuse
