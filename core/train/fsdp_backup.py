"""The backup of an FSDP run, written in shards: every process writes its own shard of the trained
weights and of the optimizer state into the backup folder, with torch.distributed.checkpoint (DCP,
the format accelerate's FSDP state saving writes), so no process ever holds the whole state. A 14B
fine-tune's AdamW state (about 170 GB in float32) gathered on the main process, as a whole-state
backup would need, fits no usual machine's memory.

The folder is a backup like any other (core/train/backup.py: built under a temporary name, each file
fsynced and its size and sha256 in backup.json, renamed into place), with DCP's files in place of
trained.safetensors and the optimizer state of state.pt:

    .metadata            where each tensor's pieces are (written by the main process)
    __<rank>_<n>.distcp  each process's shards of the trained weights ("trained.<part>/<name>") and
                         of the optimizer state ("optimizer.state.<parameter name>.<key>")

DCP stores the whole shape of every tensor, so a backup continues on another number of processes
(each takes its new shard) or on one process, as a backup of an unsharded run does. The weights alone
are read whole in one process (`read_trained`) for samples between runs and the search for a finite
backup after a diverged run.

Why not accelerate's save_fsdp_model: for a diffusers model with a peft adapter (not a PeftModel) it
writes the whole model, the frozen base included (28 GB per backup for a 14B LoRA); here only the
trained weights are written, as in every other backup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.errors import ConfigError, FollowedError, UserError

from .backup import SHARDS_METADATA_FILE, STATE_FILE

log = logging.getLogger(__name__)

TRAINED_PREFIX = "trained"
OPTIMIZER_PREFIX = "optimizer"


def is_sharded(folder: Path) -> bool:
    """Whether a backup folder holds an FSDP run's shards (else trained.safetensors)."""
    return (folder / SHARDS_METADATA_FILE).is_file()


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Sharded (each process its DTensor shards), by parameter name: independent of the process count.
    return get_optimizer_state_dict(model, _inner(optimizer), options=StateDictOptions(full_state_dict=False))


def write_shards(folder: Path, trained: Mapping[str, Any], model: Any, optimizer: Any, rank: int) -> list[Path]:
    """A collective: every process writes its shards of the trained weights and the optimizer state
    into `folder` (which every process sees). Returns the files this process wrote (the main process
    also wrote .metadata)."""
    import torch.distributed.checkpoint as dcp

    state = {TRAINED_PREFIX: {name: value.detach() for name, value in trained.items()},
             OPTIMIZER_PREFIX: _optimizer_state(model, optimizer)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True))
    return sorted(folder.glob(f"__{rank}_*.distcp"))


def load_shards(folder: Path, trained: Mapping[str, Any], model: Any, optimizer: Any) -> None:
    """A collective (one process: on its own): the backup's weights into the trained parameters
    (each process its shard of each) and its optimizer state into the optimizer."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    missing, extra = _name_differences(folder, trained)
    if missing or extra:
        raise UserError(f"the backup {folder} holds other trained weights than this run trains "
                        f"({len(missing)} missing, {len(extra)} unknown, e.g. {sorted(missing or extra)[0]}); train from the start")
    optimizer_state = _optimizer_state(model, optimizer)
    state = {TRAINED_PREFIX: {name: value.detach() for name, value in trained.items()}, OPTIMIZER_PREFIX: optimizer_state}
    with torch.no_grad():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))
    set_optimizer_state_dict(model, _inner(optimizer), optim_state_dict=state[OPTIMIZER_PREFIX],
                             options=StateDictOptions(full_state_dict=False))


def _trained_entries(folder: Path) -> dict[str, Any]:
    """The trained weights' entries of the backup's metadata: name -> (shape, dtype)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    head = f"{TRAINED_PREFIX}."
    return {key[len(head):]: entry for key, entry in metadata.state_dict_metadata.items() if key.startswith(head)}


def _name_differences(folder: Path, trained: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    saved = set(_trained_entries(folder))
    return set(trained) - saved, saved - set(trained)


def read_trained(folder: Path, names: list[str] | None = None) -> dict[str, Any]:
    """The backup's trained weights whole, in this one process (no other process takes part), as
    CPU tensors of the dtype they were trained in; `names`: only those."""
    import torch
    import torch.distributed.checkpoint as dcp

    entries = _trained_entries(folder)
    chosen = entries if names is None else {n: entries[n] for n in names}
    whole = {name: torch.empty(tuple(e.size), dtype=e.properties.dtype) for name, e in chosen.items()}
    dcp.load({TRAINED_PREFIX: whole}, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return whole


def trained_names(folder: Path) -> list[str]:
    return sorted(_trained_entries(folder))


def write_sharded_backup(accelerator: Any, backups: Any, step: int, trained: Mapping[str, Any], model: Any,
                         optimizer: Any, state: dict[str, Any], info: Mapping[str, Any]) -> Path | None:
    """A collective: the backup of `step` with every process writing its shards (the main process
    also state.pt, without the optimizer state, and backup.json). Every process hashes its own files.
    Returns the backup's folder on the main process, None elsewhere; a failure anywhere raises
    UserError on every process (the main process's names the backup and what to do)."""
    from accelerate.utils import broadcast_object_list, gather_object

    from .backup import file_record

    main, rank = accelerator.is_main_process, accelerator.process_index
    building, failure = None, None
    if main:
        try:
            building = backups.begin(step)
        except UserError as e:
            failure = e
    told = [str(building) if building is not None else None, str(failure) if failure is not None else None]
    broadcast_object_list(told)
    if told[0] is None:
        raise failure if main else FollowedError(f"the backup of step {step} could not be begun: {told[1]}")
    folder = Path(told[0])
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        mine: dict[str, Any] | str = {p.name: file_record(p) for p in write_shards(folder, trained, model, optimizer, rank)}
    except (Exception, CheckpointException) as e:  # every process learns of every failure below, then all raise
        mine = _shard_failure(e, backups.final(step))
    everyone = gather_object([mine])
    outcome: list[Any] = [None, None]
    if main:
        try:
            outcome[0] = str(_finish(backups, step, folder, everyone, state, info))
        except UserError as e:
            outcome[1], failure = str(e), e
    broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise failure if main else FollowedError(f"the backup of step {step} was not written: {outcome[1]}")
    return Path(outcome[0]) if main else None


def _finish(backups: Any, step: int, folder: Path, everyone: list[Any], state: dict[str, Any],
            info: Mapping[str, Any]) -> Path:
    """The main process's part once every process wrote: check that every shard is in the folder as
    this process sees it, write state.pt, then backups.finish."""
    import torch

    failed = [(rank, why) for rank, why in enumerate(everyone) if isinstance(why, str)]
    if failed:
        backups.abandon(folder)
        rank, why = failed[0]
        raise UserError(why if rank == 0 else f"{why} (process {rank}'s shards)")
    records = {name: record for files in everyone for name, record in files.items()}
    unseen = _unseen_shards(folder, everyone)
    if unseen:
        backups.abandon(folder)
        raise ConfigError(f"the shards that process {sorted(set(unseen))[0]} wrote for the backup of step {step} are not in "
                        f"{backups.root} as the main process sees it: with distributed.strategy FSDP on several machines "
                        "workspace_dir must be a folder every machine sees (shared storage, the same path on each)",
                        key="workspace_dir")
    try:
        torch.save(state, folder / STATE_FILE)
    except Exception as e:
        backups.abandon(folder)
        raise _failure(backups, step, e) from e
    return backups.finish(step, folder, [folder / STATE_FILE, folder / SHARDS_METADATA_FILE], info, extra_records=records)


# How long the main process waits for the other machines' shards to show in the folder: a network
# file system (NFS) may show another machine's new files only once its attribute cache expires.
SHARED_STORAGE_WAIT_SECONDS = 30.0


def _unseen_shards(folder: Path, everyone: list[dict[str, Any]]) -> list[int]:
    """The processes whose shards the main process does not see in `folder` with the size written,
    after waiting up to SHARED_STORAGE_WAIT_SECONDS for them."""
    import os
    import time

    def unseen() -> list[int]:
        missing = []
        for rank, files in enumerate(everyone):
            for name, record in files.items():
                try:
                    with open(folder / name, "rb") as handle:  # an open revalidates what NFS cached
                        size = os.fstat(handle.fileno()).st_size
                except OSError:
                    size = None
                if size != record["bytes"]:
                    missing.append(rank)
        return missing

    deadline = time.monotonic() + SHARED_STORAGE_WAIT_SECONDS
    missing = unseen()
    while missing and time.monotonic() < deadline:
        time.sleep(1.0)
        missing = unseen()
    return missing


def _shard_failure(error: BaseException, final: Path) -> str:
    """One line for a failed shard write: write_failure's (a full disk, no permission) where an OSError
    is behind it (DCP wraps each process's exception in a CheckpointException), else the error's."""
    from .backup import backup_write_failure

    causes = [error, *(pair[0] for pair in getattr(error, "failures", {}).values())]
    for cause in causes:
        explained = backup_write_failure(cause, final) if isinstance(cause, OSError) else None
        if explained is not None:
            return str(explained)
    cause = causes[-1]
    text = str(cause).strip().splitlines()
    return f"could not write the backup {final}: {type(cause).__name__}: {text[0] if text else ''}"


def _failure(backups: Any, step: int, error: Exception) -> UserError:
    from .backup import backup_write_failure

    explained = backup_write_failure(error, backups.final(step)) if isinstance(error, Exception) else None
    return explained or UserError(f"the backup of step {step} could not be written to {backups.final(step)} ({error}); "
                                  "free space there or set another workspace_dir")
