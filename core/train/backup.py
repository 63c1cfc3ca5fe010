"""Backups: everything a run needs to continue exactly where it was, written so a crash never leaves
half of one.

A backup is a folder `workspace_dir/backups/step-NNNNNNNN/`:

    trained.safetensors   the trained weights (LoRA layers, the fine-tuned model, or the embedding
                          rows), float as trained, keyed "<part>/<parameter name>"
    ema.safetensors       the EMA of those weights (when ema.enabled)
    state.pt              optimizer and scheduler state, RNG states (torch.save; loaded with
                          weights_only=True, so it holds tensors and plain containers only)
    .metadata, __<rank>_<n>.distcp
                          an FSDP run's backup: each process's shards of the trained weights and
                          the optimizer state, in place of trained.safetensors and state.pt's
                          optimizer state (core/train/fsdp_backup.py)
    backup.json           written last: step, epoch, versions, the settings and data it was made
                          with, the loss smoothing and validation watch states, and the size and
                          sha256 of every file above ("files")

The folder is built under a temporary name (`.step-NNNNNNNN.tmp-XXXX`), every file is fsynced, then
it is renamed into place in one step: a folder named step-N is complete, whatever moment the process
was killed at. Old backups beyond `backup.keep` are first renamed to a `.trash-` name, then deleted,
so a half-deleted backup never looks like a complete one. Leftover temporary and trash folders (from a
killed process) are removed the next time a backup is written. A write that fails (a full disk) is
one line naming the backup and what to do; the half-built folder is removed and the older backups
stay as they were (nothing is pruned before a new backup is in place).

The checksums are verified when a run continues from a backup (damage()), not when backups are
listed: hashing a fine-tuned model's backup reads gigabytes. A damaged backup (other bytes, a
truncated or missing file) is skipped for the newest intact one (run_backups.backup_to_resume).

A backup is refused on resume, with the reason, when it was made by another version of the app or
backup format, or with settings or data that would make the continued run differ from an
uninterrupted one (docs/training.md, "Backups and resuming").
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import fsync_dir, write_failure
from core.errors import UserError

log = logging.getLogger(__name__)

# 2: backup.json lists the size and sha256 of every file. Format 1 (the same files, no checksums)
# is still read: a run of the same app version continues from it, checked by loading its files.
BACKUP_FORMAT = 2
READABLE_FORMATS = (1, 2)
FILES_KEY = "files"
BACKUPS_DIR_NAME = "backups"
INFO_FILE = "backup.json"
TRAINED_FILE = "trained.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
SHARDS_METADATA_FILE = ".metadata"  # an FSDP run's backup: its shards in place of trained.safetensors (fsdp_backup.py)
_NAME = re.compile(r"^step-(\d{8,})$")

RUN_LENGTH_KEYS = ("max_steps", "epochs", "stop_after")

# Settings that change nothing in the trained weights or in the order of what is trained: a backup
# made with other values of these resumes. Everything else must match (see settings_fingerprint).
RESUMABLE_CHANGES = (
    # Per process: what must stay is the global batch (batch_size x processes), compared with the data.
    "batch_size",
    "distributed.processes",
    "distributed.machines",
    "backup",
    "sampling",
    # The data is compared by content instead (resume.data_fingerprint: every training clip's cache
    # keys and repeats): a dataset folder that moved still resumes, one whose clips changed does not.
    "datasets",
    "validation",
    "dataloader_threads",
    "workspace_dir",
    "cache_dir",
    "output_path",
    "output_format",
    "strict_data",
    "ema.device",
    # The run's length: a run continued to another total trains the same batches up to the
    # backup's step; how the learning-rate schedule is carried on is extend.carry_schedule's.
    *RUN_LENGTH_KEYS,
)


def _without(config: Mapping[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in config:
        return
    if rest:
        if isinstance(config[head], dict):
            _without(config[head], rest)
    else:
        del config[head]  # type: ignore[attr-defined]


def settings_fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide the trained weights, as plain JSON values (for backup.json)."""
    copy = json.loads(json.dumps(dict(config), default=str))
    for key in RESUMABLE_CHANGES:
        _without(copy, key)
    return copy


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def settings_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprints, with both values."""
    a, b = _flatten(dict(saved)), _flatten(dict(current))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key} was {json.dumps(a.get(key))}, now {json.dumps(b.get(key))}")
    return out


@dataclass(frozen=True)
class Backup:
    """A complete backup folder and what its backup.json says."""

    path: Path
    step: int
    info: dict[str, Any]


def sync_file(path: Path) -> None:
    """fsync one written file of a backup being built (the folder is renamed into place later)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


_HASH_CHUNK = 8 * 2**20


def file_sha256(path: Path) -> str:
    import hashlib  # here: the window lists backups before its first paint, and hashlib costs it 6 ms

    h = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while count := handle.readinto(buffer):
            h.update(view[:count])
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What backup.json keeps of one of its files: enough to tell it was damaged since."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def damage(backup: Backup) -> str | None:
    """Why the backup's files are not the ones written (missing, another size, other bytes), or
    None when each matches its record in backup.json. Reads every file (the cost of a resume).
    A format-1 backup has no records: None (the caller checks it by loading it)."""
    if backup.info.get("format") == 1:
        return None
    records = backup.info.get(FILES_KEY)
    weights = SHARDS_METADATA_FILE if SHARDS_METADATA_FILE in (records or {}) else TRAINED_FILE
    if not isinstance(records, dict) or weights not in records or STATE_FILE not in records:
        return f"its {INFO_FILE} lists no checksums of its files"
    listed = sorted(records.items())
    for name, record in listed:  # sizes first: a missing or truncated file is told without hashing
        if Path(name).name != name or not isinstance(record, dict):
            return f"its {INFO_FILE} lists an unexpected file {name!r}"
        try:
            size = (backup.path / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if size != record.get("bytes"):
            return f"{name} has {size} bytes, not the {record.get('bytes')} written"
    for name, record in listed:
        if file_sha256(backup.path / name) != record.get("sha256"):
            return f"{name} does not hold the bytes that were written (its sha256 differs)"
    return None


class BackupFolder:
    """The backups of one workspace: write, list, find the newest, prune."""

    def __init__(self, workspace_dir: str | os.PathLike, keep: int = 3) -> None:
        self.root = Path(workspace_dir).expanduser() / BACKUPS_DIR_NAME
        self.keep = max(1, int(keep))

    # -- reading ---------------------------------------------------------------------------------
    def complete(self) -> list[Backup]:
        """Complete backups, oldest first. A folder named step-N is complete by construction; one
        whose backup.json is missing or unreadable (damaged by hand or by the disk) is skipped with
        a warning."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _NAME.match(child.name)
            if not match or not child.is_dir():
                continue
            try:
                info = json.loads((child / INFO_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                log.warning("backup %s is damaged and is skipped (%s)", child, e)
                continue
            found.append(Backup(child, int(match.group(1)), info))
        return sorted(found, key=lambda b: b.step)

    def newest(self) -> Backup | None:
        backups = self.complete()
        return backups[-1] if backups else None

    # -- writing ---------------------------------------------------------------------------------
    def set_aside(self) -> list[Path]:
        """Move an earlier run's backups into `earlier-<time>/` (a run from the start must not mix
        its backups with them, and must not delete them). Returns the new folder, if any."""
        backups = self.complete()
        if not backups:
            return []
        aside = self.root / f"earlier-{stamp()}"
        aside.mkdir()
        for old in backups:
            os.replace(old.path, aside / old.path.name)
        return [aside]

    def write(self, step: int, fill: Callable[[Path], list[Path]], info: Mapping[str, Any]) -> Path:
        """Write a backup of `step`: fill(folder) writes its files into the folder being built (straight
        to disk: a fine-tuned model's weights are not held twice in memory) and returns them; each
        is fsynced and its size and sha256 recorded, then backup.json is written last.

        An existing backup of the same step is replaced (the new one is renamed in after the old
        one is moved aside). A failed write raises UserError naming the backup and what to do; the
        older backups are left as they were."""
        building = self.begin(step)
        try:
            written = fill(building)
        except BaseException as e:
            self.abandon(building)
            explained = backup_write_failure(e, self.final(step)) if isinstance(e, Exception) else None
            if explained is None:
                raise
            raise explained from e
        return self.finish(step, building, written, info)

    def final(self, step: int) -> Path:
        return self.root / f"step-{int(step):08d}"

    def begin(self, step: int) -> Path:
        """The temporary folder a backup of `step` is built in (the backups folder made, leftovers of
        killed writes removed). UserError when it cannot be made (a full disk, no permission)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            return Path(tempfile.mkdtemp(prefix=f".{self.final(step).name}.tmp-", dir=self.root))
        except Exception as e:
            explained = backup_write_failure(e, self.final(step))
            if explained is None:
                raise
            raise explained from e

    @staticmethod
    def abandon(building: Path) -> None:
        shutil.rmtree(building, ignore_errors=True)

    def finish(self, step: int, building: Path, written: list[Path], info: Mapping[str, Any], *,
               extra_records: Mapping[str, Any] | None = None) -> Path:
        """Complete a backup built in `building`: fsync and record every written file (extra_records:
        files other processes wrote and recorded themselves), write backup.json last, rename the folder
        into place, prune. The folder is removed if any of it fails (UserError, as write's)."""
        final = self.final(step)
        try:
            try:
                records = dict(extra_records or {})
                for path in written:
                    sync_file(path)
                    records[path.name] = file_record(path)
                full_info = {**dict(info), FILES_KEY: records}
                info_bytes = (json.dumps(full_info, indent=2, default=str) + "\n").encode("utf-8")
                write_file_synced(building / INFO_FILE, info_bytes)
                fsync_dir(building)
                self._put_in_place(building, final)
            except BaseException:
                self.abandon(building)
                raise
        except Exception as e:
            explained = backup_write_failure(e, final)
            if explained is None:
                raise
            raise explained from e
        try:
            self.prune()
        except OSError as e:  # the new backup is in place; a few extra old ones are no reason to stop
            log.warning("could not delete old backups in %s (%s); they are deleted with the next backup", self.root, e)
        return final

    def _put_in_place(self, building: Path, final: Path) -> None:
        """Rename the built folder to its step-N name; one of the same step is replaced, and put
        back if the rename fails."""
        if not final.exists():
            os.replace(building, final)
            fsync_dir(self.root)
            return
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{final.name}-", dir=self.root))
        os.replace(final, trash / final.name)
        try:
            os.replace(building, final)
        except BaseException:
            os.replace(trash / final.name, final)
            raise
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self) -> None:
        """Delete the oldest complete backups beyond `keep`."""
        backups = self.complete()
        for old in backups[: max(0, len(backups) - self.keep)]:
            self._discard(old.path)

    def _discard(self, folder: Path) -> None:
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{folder.name}-", dir=self.root))
        os.replace(folder, trash / folder.name)  # atomic: the step-N name is gone before any deleting
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        for child in self.root.iterdir():
            if child.name.startswith(".") and (".tmp-" in child.name or child.name.startswith(".trash-")):
                shutil.rmtree(child, ignore_errors=True)


def backup_write_failure(error: Exception, final: Path) -> UserError | None:
    """write_failure's line for a failed backup, naming the backup rather than its temporary
    folder, which is gone by the time the message is read."""
    if isinstance(error, OSError) and f".{final.name}.tmp-" in str(error.filename or ""):
        error = OSError(error.errno, error.strerror)
    return write_failure(error, final, "the backup", key="workspace_dir")


def stamp() -> str:
    """A UTC time for names of set-aside files: sortable, and valid on every file system."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def check_resumable(backup: Backup, *, app_version: str, fingerprint: Mapping[str, Any], data: Mapping[str, Any] | None) -> None:
    """Raise UserError (one line, with what to do) when this run must not continue from the backup.
    data None checks the version and settings only (before the data is planned: caching can be long)."""
    info = backup.info
    where = f"the backup {backup.path}"
    if info.get("format") not in READABLE_FORMATS:
        raise UserError(f"{where} has backup format {info.get('format')}; this version reads formats "
                        f"{', '.join(map(str, READABLE_FORMATS))}. "
                        "Train from the start, or continue with the version that made it")
    if info.get("app_version") != app_version:
        raise UserError(f"{where} was made by Video Trainer {info.get('app_version')}, this is {app_version}; "
                        "continue with that version, or train from the start")
    differences = settings_differences(info.get("settings", {}), fingerprint)
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise UserError(f"{where} was made with other settings ({shown}); set them back to continue, or train from the start "
                        "(a continued run with other settings would not be the run that was interrupted)")
    if data is None:
        return
    saved_data = info.get("data", {})
    saved_batch, batch = saved_data.get("global_batch"), data.get("global_batch")
    if saved_batch != batch and saved_batch is not None and batch is not None:
        from core.errors import ConfigError

        raise ConfigError(f"{where} was made with a global batch of {saved_batch[0]} images / {saved_batch[1]} videos "
                          f"(batch_size x processes), this run's is {batch[0]} / {batch[1]}; set batch_size so that "
                          "batch_size x processes is what it was, or train from the start", key="batch_size")
    for key in sorted(set(saved_data) | set(data)):
        if saved_data.get(key) != data.get(key):
            raise UserError(f"{where} was made with other training data ({key} changed: clips were added, removed or edited, "
                            "or another number of processes runs); restore them to continue, or train from the start")
