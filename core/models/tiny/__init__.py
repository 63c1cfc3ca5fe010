"""Tiny, randomly initialised models of the real architectures, for tests and the demo.

build_tiny_model() writes a diffusers-format folder (model_index.json plus one subfolder per
component) that the family's real diffusers pipeline loads with from_pretrained(), exactly as it
would load the hub's weights. Everything is built offline from the real diffusers/transformers
classes with tiny configs; see docs/tiny-models.md.

This module imports nothing heavy: torch, diffusers and transformers are imported by the family
builders, which are loaded only when a model is built (the CLI lists families without torch).
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_FAMILIES: tuple[str, ...] = ("wan21", "wan22_ti2v_5b", "wan22_a14b", "wan22_a14b_i2v", "hunyuan_video", "hunyuan_video_i2v", "cogvideox",
                                 "cogvideox_i2v", "cogvideox15", "cogvideox15_i2v", "hidream")

# family -> (module under core.models.tiny, builder function name)
_BUILDERS: dict[str, tuple[str, str]] = {
    "wan21": ("wan", "build_wan21"),
    "wan22_ti2v_5b": ("wan", "build_wan22_ti2v_5b"),
    "wan22_a14b": ("wan", "build_wan22_a14b"),
    "wan22_a14b_i2v": ("wan", "build_wan22_a14b_i2v"),
    "hunyuan_video": ("hunyuan", "build_hunyuan_video"),
    "hunyuan_video_i2v": ("hunyuan", "build_hunyuan_video_i2v"),
    "cogvideox": ("cogvideox", "build_cogvideox"),
    "cogvideox_i2v": ("cogvideox", "build_cogvideox_i2v"),
    "cogvideox15": ("cogvideox", "build_cogvideox15"),
    "cogvideox15_i2v": ("cogvideox", "build_cogvideox15_i2v"),
    "hidream": ("hidream", "build_hidream"),
}


def _check_out_dir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; choose a new folder for the tiny model")
        if any(out.iterdir()):
            raise FileExistsError(
                f"{out} already exists and is not empty; choose a new or empty folder (nothing was overwritten)"
            )


def folder_size(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under path."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def build_tiny_model(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny model of `family` into the new folder `out_dir` and return its path.

    The folder is written under a temporary sibling name and renamed at the end, so a crash never
    leaves a half-written model under the final name. Raises ValueError for an unknown family and
    FileExistsError if out_dir exists and is not empty.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of: {', '.join(TINY_FAMILIES)}")
    out = Path(out_dir).expanduser().absolute()
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    module_name, func_name = _BUILDERS[family]
    builder = getattr(importlib.import_module(f"{__name__}.{module_name}"), func_name)

    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    started = time.perf_counter()
    try:
        tmp.mkdir()
        builder(tmp, seed)
        _check_out_dir(out)  # someone may have written there while we were building
        if out.exists():
            out.rmdir()  # empty: renaming onto an existing folder fails on Windows
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "wrote tiny %s model (seed %d) to %s: %.1f MB in %.1f s",
        family, seed, out, folder_size(out) / 1e6, time.perf_counter() - started,
    )
    return out


__all__ = ["TINY_FAMILIES", "build_tiny_model", "folder_size"]
