"""The validation split: a separate folder, or a stable hash-chosen fraction of the items.

See docs/data-pipeline.md, "Hold-out".
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .discovery import Item, discover
from .media import Issue

log = logging.getLogger(__name__)

VALIDATION_DATASET = -1  # dataset_index of items found in validation.folder


def validation_folder(config: dict[str, Any]) -> Path | None:
    folder = str((config.get("validation") or {}).get("folder") or "").strip()
    return Path(os.path.expanduser(folder)) if folder else None


def discover_validation(config: dict[str, Any]) -> tuple[list[Item], list[Issue]]:
    """The items of validation.folder (none when it is not set), and its issues."""
    folder = validation_folder(config)
    if folder is None:
        return [], []
    return discover(folder, VALIDATION_DATASET, 1)


def holdout_rank(item: Item, seed: int) -> bytes:
    """The item's place in the hold-out order: a hash of its path inside its dataset and the seed,
    so the choice does not depend on where the dataset lives or on the other files."""
    return hashlib.sha256(f"{seed}\0{item.relative_path}".encode()).digest()


def holdout_count(n: int, fraction: float) -> int:
    """Items to hold out of n: the fraction rounded, at least 1 (when fraction > 0 and n >= 2),
    and never all of them."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))


def split_holdout(
    items: Sequence[Item],
    config: dict[str, Any],
    *,
    validation: Sequence[Item] | None = None,
) -> tuple[list[Item], list[Item]]:
    """(training items, validation items). No file is in both.

    With validation.folder set, the validation items are that folder's (pass them as `validation`
    when they are already discovered; otherwise the folder is scanned here and its issues logged),
    and any training item that is the same file is dropped from training.
    """
    if validation_folder(config) is not None:
        if validation is None:
            validation, issues = discover_validation(config)
            for issue in issues:
                log.warning("validation folder: %s", issue)
        held = {_identity(i.path) for i in validation}
        train = [i for i in items if _identity(i.path) not in held]
        return train, list(validation)

    fraction = float((config.get("validation") or {}).get("holdout_fraction") or 0.0)
    k = holdout_count(len(items), fraction)
    if k == 0:
        return list(items), []
    seed = int(config.get("seed", 0))
    # Ties (the same relative path in two datasets) fall back to the full path, for determinism.
    order = sorted(range(len(items)), key=lambda n: (holdout_rank(items[n], seed), str(items[n].path)))
    chosen = set(order[:k])
    held_out = [i for n, i in enumerate(items) if n in chosen]
    # The same file listed twice (two datasets over one folder) must not end up on both sides.
    held = {_identity(i.path) for i in held_out}
    train = [i for n, i in enumerate(items) if n not in chosen and _identity(i.path) not in held]
    return train, held_out


def _identity(path: Path) -> str:
    # The real file, so a validation folder inside (or linked into) a dataset is recognised.
    return os.path.normcase(os.path.realpath(path))
