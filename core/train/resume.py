"""What goes into a backup and how a run takes it back (core/train/backup.py writes the folder).

Exactness: everything random in a step is seeded by (seed, step) (noise, noise levels, frame
dropout, the data order), so a resumed run only needs the trained weights, the optimizer's and
scheduler's state, the EMA, and the global RNG states (LoRA dropout draws from torch's global
generator). The loop restores the RNG states after its data iterator is created, because creating
one draws a seed from the global generator in the uninterrupted run too.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .backup import (
    BACKUP_FORMAT,
    EMA_FILE,
    STATE_FILE,
    TRAINED_FILE,
    Backup,
    settings_fingerprint,
)


def rng_for_process(state: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The RNG states a process continues with: its own from a backup of as many processes, else the
    main process's (another process count shares the batches otherwise; what is drawn per sample is
    seeded by (seed, step, position) and does not depend on these states)."""
    per_process = state.get("rng_by_process")
    if per_process and len(per_process) == world_size:
        return per_process[rank]
    return state["rng"]


def rng_states() -> dict[str, Any]:
    import numpy as np

    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def data_fingerprint(plan: Any, world_size: int, batch_size: int, video_multiplier: float) -> dict[str, Any]:
    """What decides the data order: the cached entries of every training sample and its repeats,
    and the global batch sizes (images, videos: per process x processes), which decide the sequence
    of batches and each sample's noise; the number of processes sharing them may change."""
    from core.data.buckets import video_batch_size

    h = hashlib.sha256()
    for sample in plan.train:
        h.update(json.dumps([list(sample.latent_keys), sample.text_key, sample.item.repeats]).encode())
    return {"train_samples": hashlib.sha256(h.digest()).hexdigest()[:32], "count": len(plan.train),
            "global_batch": [int(batch_size * world_size), int(video_batch_size(batch_size, video_multiplier) * world_size)]}


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(path))
    return path


def backup_filler(trained: Mapping[str, torch.Tensor], state: Mapping[str, Any],
                  ema: Mapping[str, torch.Tensor] | None) -> Callable[[Path], list[Path]]:
    """fill(folder) for BackupFolder.write: the backup's files (backup.json is made by backup_info)."""

    def fill(folder: Path) -> list[Path]:
        written = [_save_tensors(trained, folder / TRAINED_FILE)]
        torch.save(dict(state), folder / STATE_FILE)
        written.append(folder / STATE_FILE)
        if ema is not None:
            written.append(_save_tensors(ema, folder / EMA_FILE))
        return written

    return fill


def backup_info(*, step: int, batch_step: int, epoch: int, config: Mapping[str, Any], data: Mapping[str, Any],
                app_version: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": BACKUP_FORMAT,
        "app_version": app_version,
        "step": int(step),
        "batch_step": int(batch_step),
        "epoch": int(epoch),
        "settings": settings_fingerprint(config),
        "data": dict(data),
        **dict(extra),
    }


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_state(backup: Backup) -> dict[str, Any]:
    """state.pt: the optimizer (but for an FSDP run's, which is in its shards), scheduler and RNG states."""
    return torch.load(backup.path / STATE_FILE, map_location="cpu", weights_only=True)


def read_backup(backup: Backup) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """(trained weights, state.pt contents, EMA weights or None) of a complete backup."""
    trained = read_tensors(backup.path / TRAINED_FILE)
    state = read_state(backup)
    ema_file = backup.path / EMA_FILE
    ema = read_tensors(ema_file) if ema_file.exists() else None
    return trained, state, ema


def load_trained(params: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    """Copy a backup's weights into the run's trained parameters (names must match one to one)."""
    from core.errors import UserError

    missing, extra = set(params) - set(tensors), set(tensors) - set(params)
    if missing or extra:
        raise UserError(f"the backup {where} holds other trained weights than this run trains "
                        f"({len(missing)} missing, {len(extra)} unknown, e.g. {sorted(missing or extra)[0]}); train from the start")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
