"""Where a run's result may go, checked before the first step and again at the final save.

The promises (docs/long-runs.md, "What the app writes, and what it never touches"):

- output_path, workspace_dir and cache_dir are set: an empty one would mean the folder the app was
  started from.
- A result never is, holds or lies inside the base model (its folder, its hub cache folder,
  transformer.model_path) or a dataset (datasets, validation.folder), and never is or holds the
  workspace or the cache (a LoRA file inside the workspace is fine).
- An existing path where a result goes is replaced only when Video Trainer wrote it: a .safetensors
  file whose header carries a `video_trainer.` key, or a model folder with video_trainer.json that
  holds nothing a save would not write. Anything else is refused by name and left as it is.
- The folder the result goes to can be written (a probe file, removed again), so a read-only or full
  disk is found before training, not after the last step.
- At the final save the trained weights must be finite (a diverged run saves nothing). When the save
  fails anyway, the weights are kept as the backup of the final step, and the message says how to
  finish the save: continuing the run (--resume) from a backup of its last step trains nothing more
  and saves again, to the output_path set then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import write_failure
from core.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Every LoRA and embedding file the app writes carries methods.base.WRITTEN_BY in its safetensors
# header. LoRA files of earlier versions carry other `video_trainer.` keys (steps, base model), which
# count as the mark too.
_MARK_PREFIX = "video_trainer."
# The mark of a fine-tuned model folder (written with every save, see methods/finetune.py).
FOLDER_MARK = "video_trainer.json"
# A safetensors header larger than this is not one the app wrote (ours are a few kB).
_HEADER_LIMIT = 16 * 2**20
# The settings that name folders the app writes into; empty would mean the working directory.
REQUIRED_PATHS = {
    "output_path": "the result (a .safetensors file for LORA and EMBEDDING, a folder for FINE_TUNE)",
    "workspace_dir": "the run's backups, metrics and samples (for example ~/VideoTrainer/workspace)",
    "cache_dir": "the cached latents and text embeddings (for example ~/VideoTrainer/cache)",
}


@dataclass(frozen=True)
class Target:
    """One path the final save writes."""

    path: Path
    folder: bool  # a model folder (FINE_TUNE), else one .safetensors file
    role: str  # how the message names it: "output_path", "the EMA copy of output_path"


# -- before the run ----------------------------------------------------------------------------------
def check_paths_set(config: Mapping[str, Any], keys: tuple[str, ...] = tuple(REQUIRED_PATHS)) -> None:
    """Refuse an empty output_path, workspace_dir or cache_dir by name."""
    for key in keys:
        if not str(config.get(key) or "").strip():
            raise ConfigError(f"{key} is empty, which would mean the folder the app was started from; set it to a "
                              f"path for {REQUIRED_PATHS[key]}", key=key)


def planned_targets(config: Mapping[str, Any], adapter: Any, denoiser_names: list[str]) -> list[Target]:
    """Every path the run's final save writes: the result, one file per expert, the EMA copies."""
    from .methods import parts_for

    parts = parts_for(config["training_method"])
    suffixes = ["", "-ema"] if config["ema"]["enabled"] else [""]
    output = Path(str(config["output_path"])).expanduser()
    targets = []
    for suffix in suffixes:
        for path in parts.result_paths(dict(config), adapter, denoiser_names, ema_suffix=suffix):
            role = ("the EMA copy of output_path (ema.enabled)" if suffix else
                    "output_path" if path == output else "named after output_path")
            targets.append(Target(path, parts.saves_folder, role))
    return targets


def check_outputs(config: Mapping[str, Any], adapter: Any, denoiser_names: list[str]) -> list[Target]:
    """All the checks of the module docstring, before any work; returns the targets for save_result."""
    check_paths_set(config)
    targets = planned_targets(config, adapter, denoiser_names)
    for target in targets:
        check_target(target, config, adapter)
    for folder in dict.fromkeys(t.path.parent for t in targets):
        probe_writable(folder, next(t for t in targets if t.path.parent == folder))
    return targets


def check_target(target: Target, config: Mapping[str, Any], adapter: Any) -> None:
    """Raise ConfigError when the save must not write `target`: an overlap, or an existing path the
    app did not write."""
    _check_overlaps(target, config, adapter)
    problem = _existing_problem(target, _base_entries(adapter))
    if problem:
        raise ConfigError(problem, key="output_path")


def _real(path: str | os.PathLike) -> Path:
    """The path with ~ expanded and every symlink resolved, in the file system's case (Windows)."""
    return Path(os.path.normcase(os.path.realpath(os.path.expanduser(os.fspath(path)))))


def _relation(output: Path, place: Path) -> str | None:
    if output == place:
        return "is"
    if place in output.parents:
        return "lies inside"
    if output in place.parents:
        return "holds"
    return None


def _protected(config: Mapping[str, Any], adapter: Any) -> list[tuple[Path, str, str]]:
    """(path, what it is, the setting naming it) of what a result must keep out of."""
    base = Path(adapter.folder)
    places = [(base, "the base model folder", "base_model")]
    if base.parent.name == "snapshots" and base.parent.parent.name.startswith("models--"):
        # A hub download: the snapshot's files are links into the repository's blobs/.
        places.append((base.parent.parent, "the base model's hub cache folder", "base_model"))
    model_path = str(config["transformer"]["model_path"] or "").strip()
    if model_path:
        places.append((Path(model_path), "the transformer checkpoint", "transformer.model_path"))
    for i, dataset in enumerate(config["datasets"]):
        if str(dataset.get("path") or "").strip():
            places.append((Path(dataset["path"]), "the dataset folder", f"datasets[{i}].path"))
    validation_folder = str(config["validation"]["folder"] or "").strip()
    if validation_folder:
        places.append((Path(validation_folder), "the validation folder", "validation.folder"))
    return places


def _check_overlaps(target: Target, config: Mapping[str, Any], adapter: Any) -> None:
    output = _real(target.path)
    for place, what, key in _protected(config, adapter):
        relation = _relation(output, _real(place))
        if relation:
            why = "a save there would replace it" if relation == "holds" else "the app never writes there"
            raise ConfigError(f"{target.path} ({target.role}) {relation} {what} {place} ({key}); {why}: choose an "
                              "output_path outside it", key="output_path", also=(key,))
    for key, what in (("workspace_dir", "the workspace"), ("cache_dir", "the cache folder")):
        place = Path(str(config[key])).expanduser()
        relation = _relation(output, _real(place))
        if relation in ("is", "holds"):
            raise ConfigError(f"{target.path} ({target.role}) {relation} {what} {place} ({key}); a save there would "
                              f"replace it: choose an output_path outside it", key="output_path", also=(key,))


def _base_entries(adapter: Any) -> set[str]:
    """What a model folder save takes from the base folder: its entries but the hidden ones."""
    try:
        return {name for name in os.listdir(adapter.folder) if not name.startswith(".")}
    except OSError:
        return set()


def _existing_problem(target: Target, base_entries: set[str]) -> str | None:
    """Why an existing path at target must not be replaced; None when nothing is there or the app wrote it."""
    path = target.path
    if not os.path.lexists(path):
        return None
    keep = "it is left as it is: choose another output_path, or remove it yourself"
    if target.folder:
        if not path.is_dir():
            return f"{path} ({target.role}) is an existing file, but FINE_TUNE saves a folder there; {keep}"
        entries = sorted(os.listdir(path))
        if not entries:
            return None  # an empty folder: nothing in it to lose
        if not _is_folder_mark(path / FOLDER_MARK):
            return (f"{path} ({target.role}) is an existing folder that Video Trainer did not write (it has no "
                    f"{FOLDER_MARK}), and a save replaces the whole folder; {keep}")
        extra = [name for name in entries if name not in base_entries and name != FOLDER_MARK]
        if extra:
            return (f"{path} ({target.role}) holds {extra[0]}, which Video Trainer did not write, and a save replaces the "
                    f"whole folder; move it out, or choose another output_path")
        return None
    if path.is_dir():
        return f"{path} ({target.role}) is an existing folder, but the result is one .safetensors file; {keep}"
    if not _has_mark(path):
        return (f"{path} ({target.role}) is an existing file that Video Trainer did not write (no Video Trainer mark in "
                f"its header); {keep}")
    return None


def _is_folder_mark(path: Path) -> bool:
    try:
        return path.is_file() and isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def safetensors_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `__metadata__` of a .safetensors file's header, read without loading a tensor; None when the
    file is not one (or cannot be read)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= _HEADER_LIMIT:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


def _has_mark(path: Path) -> bool:
    metadata = safetensors_metadata(path)
    return metadata is not None and any(str(key).startswith(_MARK_PREFIX) for key in metadata)


def probe_writable(folder: Path, target: Target) -> None:
    """Create `folder` if needed and write, sync and remove a small file in it: a read-only or full disk,
    or a folder the user may not write to, is one line naming the output before any training."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{target.path} ({target.role}) cannot be created: {existing} is a file, not a folder; "
                          "choose another output_path", key="output_path")
    # The folders the probe makes are removed again: a run refused later leaves nothing behind, and
    # the save makes them when it writes.
    made = [p for p in (folder, *folder.parents) if p not in (existing, *existing.parents)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd, name = tempfile.mkstemp(prefix=".video-trainer-probe-", suffix=".tmp", dir=folder)
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(name)
        finally:
            for created in made:  # deepest first
                with contextlib.suppress(OSError):
                    created.rmdir()
    except OSError as e:
        # Without the probe's own name: the message names the output the user chose.
        explained = write_failure(OSError(e.errno, e.strerror), target.path, "the result", key="output_path")
        if explained is None:
            raise
        raise explained from None


# -- the final save ------------------------------------------------------------------------------------
def first_nonfinite(tensors: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity; None when all are finite."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            return name
    return None


def save_result(run: Any, models: list[Any], result: Any, targets: list[Target], backups: Any) -> list[Path]:
    """Save the run's result (and its EMA copy) after checking that the weights are finite and the
    targets still free; a failed save keeps the weights in a backup and says how to finish it.
    run: loop.RunParts; result: loop.TrainResult; backups: backup.BackupFolder."""
    bad = first_nonfinite(run.parts.named_trainable())
    if bad is None and run.ema is not None:
        averaged = first_nonfinite(run.ema.tensors())
        bad = f"the EMA of {averaged}" if averaged is not None else None
    if bad is not None:
        raise UserError(_diverged_message(bad, result.steps, run.config, backups))
    saved: list[Path] = []
    try:
        for target in targets:  # something may have appeared at a target during the run
            check_target(target, run.config, run.adapter)
        saved.extend(run.parts.save(models, result.steps))
        if run.ema is not None:
            with run.ema.applied():
                saved.extend(run.parts.save(models, result.steps, ema_suffix="-ema"))
    except Exception as error:
        failure = _save_failure(error, run, result, targets, backups, saved)
        if failure is None:
            raise
        raise failure from error
    return saved


def _diverged_message(bad: str, steps: int, config: Mapping[str, Any], backups: Any) -> str:
    good = newest_finite_backup(backups)
    where = (f"the last backup with finite weights is {good.path} (step {good.step})" if good is not None
             else "no backup of this run holds finite weights")
    return (f"the trained weights hold NaN or infinite values ({bad}) after step {steps}: the run diverged, so nothing "
            f"was saved to {config['output_path']} (output_path); lower learning_rate and train again; {where}")


def newest_finite_backup(backups: Any) -> Any:
    """The newest complete backup whose trained weights are all finite, or None (read on failure only)."""
    from .fsdp_backup import is_sharded

    for backup in reversed(backups.complete()):
        try:
            finite = _sharded_finite(backup.path) if is_sharded(backup.path) else _file_finite(backup.path)
        except Exception as e:  # a damaged file (OSError, SafetensorError, DCP's errors): not a good backup
            log.warning("backup %s could not be read (%s)", backup.path, e)
            continue
        if finite:
            return backup
    return None


def _file_finite(folder: Any) -> bool:
    from safetensors import safe_open

    from .backup import TRAINED_FILE

    with safe_open(str(folder / TRAINED_FILE), framework="pt") as handle:
        return all(first_nonfinite({key: handle.get_tensor(key)}) is None for key in handle.keys())


def _sharded_finite(folder: Any, per_read: int = 64) -> bool:
    """An FSDP run's backup, read in groups of tensors (a fine-tune's weights whole would not fit)."""
    from .fsdp_backup import read_trained, trained_names

    names = trained_names(folder)
    return all(first_nonfinite(read_trained(folder, names[i:i + per_read])) is None for i in range(0, len(names), per_read))


def _save_failure(error: Exception, run: Any, result: Any, targets: list[Target], backups: Any,
                  saved: list[Path]) -> UserError | None:
    """The one-line UserError for a failed final save, after keeping the weights; None for a failure that
    is not the disk's or the user's (a bug stays a bug), after logging where the weights are."""
    if isinstance(error, UserError):
        reason = str(error)
    else:
        explained = write_failure(error, targets[0].path, "the result", key="output_path")
        reason = str(explained) if explained is not None else None
    kept, why_not = _keep_weights(run, result, backups)
    done = f" ({', '.join(map(str, saved))} was saved)" if saved else ""
    if kept is not None:
        finish = (f"nothing is lost: the trained weights of step {result.steps} are kept in the backup {kept}; fix "
                  "that, or set another output_path, and continue the run (train --resume, or Continue in the "
                  "window): it saves them without training further")
    else:
        newest = backups.newest()
        fallback = (f"the newest backup is {newest.path} (step {newest.step}): free space, then continue from it with "
                    "--resume" if newest is not None else "there is no backup of this run to continue from")
        finish = f"keeping the trained weights in a backup failed too ({why_not}); {fallback}"
    if reason is None:
        log.error("the final save failed%s; %s", done, finish)
        run.callbacks.on_log(logging.ERROR, f"the final save failed{done}; {finish}")
        return None
    return UserError(" ".join(f"{reason}{done}; {finish}".split()))


def _keep_weights(run: Any, result: Any, backups: Any) -> tuple[Path | None, str | None]:
    """(the backup holding the final step's weights, None) or (None, why it could not be written)."""
    newest = backups.newest()
    if newest is not None and newest.step == result.steps:
        return newest.path, None  # written after the last step already (due, or the run was stopped)
    # The batch step and epoch the loop would have recorded for its last step.
    batch_step = result.steps * run.config["gradient_accumulation_steps"] - 1
    try:
        return Path(run.backup(result.steps, batch_step, batch_step // run.batches_per_pass)), None
    except Exception as e:
        explained = write_failure(e, backups.root, "the backup")
        log.debug("keeping the unsaved weights failed", exc_info=True)
        return None, str(explained) if explained is not None else f"{type(e).__name__}: {e}"


__all__ = [
    "FOLDER_MARK",
    "REQUIRED_PATHS",
    "Target",
    "check_outputs",
    "check_paths_set",
    "check_target",
    "first_nonfinite",
    "newest_finite_backup",
    "planned_targets",
    "probe_writable",
    "safetensors_metadata",
    "save_result",
]
