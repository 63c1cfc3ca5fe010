"""Save a fine-tuned model as a complete diffusers pipeline folder, atomically.

The trained components (transformer, transformer_2, text_encoder, ...) are written with their own
save_pretrained() in their current dtype; everything else (model_index.json, scheduler, VAE, tokenizer,
untrained encoders) comes from the base folder, hard-linked where the filesystem allows (no extra disk)
and copied otherwise. Never symlinked: the user may delete the base, or the hub cache it lives in. A hub
snapshot's files are symlinks into its blobs; the real contents are linked or copied.

Atomicity: the folder is built as `.NAME.tmp-XXXX` beside the output and every file is fsynced. Then:
    1. an existing NAME is renamed to `.NAME.old-XXXX`,
    2. the new folder is renamed to NAME,
    3. the old one is deleted.
A failure before step 3 puts the old folder back. A crash between steps 1 and 2 (two renames, a window
of microseconds) leaves no NAME but the previous result intact under `.NAME.old-XXXX`; the next save to
NAME, or recover_interrupted(NAME), renames it back. Leftover `.NAME.tmp-*` folders are incomplete
by definition and are deleted by the next save.
"""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.atomic import fsync_dir
from core.errors import UserError

log = logging.getLogger(__name__)


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder with a model_index.json: what diffusers' DiffusionPipeline.from_pretrained reads."""
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / "model_index.json").is_file()


def recover_interrupted(output_dir: str | os.PathLike) -> bool:
    """Put back a previous result that a crash left as `.NAME.old-XXXX` with no NAME; True if one was."""
    out = Path(output_dir).expanduser().absolute()
    if out.exists() or not out.parent.is_dir():
        return False
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not olds:
        return False
    os.replace(olds[0], out)
    log.warning("restored %s from %s, left by an interrupted save", out, olds[0].name)
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    real = src.resolve()  # a hub snapshot's file is a symlink into blobs/: take the blob itself
    try:
        os.link(real, dst)
    except OSError:  # another filesystem, no hard links (FAT, some network shares), link limit
        shutil.copyfile(real, dst)


def _copy_tree(src: Path, dst: Path) -> int:
    """Copy src (a file or folder, following symlinks) to dst; returns the number of files."""
    if not src.exists():
        raise UserError(f"{src} is a broken link (its target is gone); repair or re-download the base model")
    if src.is_file():
        _link_or_copy(src, dst)
        return 1
    dst.mkdir()
    count = 0
    for child in sorted(src.iterdir()):
        count += _copy_tree(child, dst / child.name)
    return count


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under root to disk, so the renames publish complete data."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


def _save_component(module: Any, folder: Path) -> None:
    kwargs: dict[str, Any] = {}
    # diffusers' ModelMixin takes safe_serialization; transformers 5 always writes safetensors and has
    # dropped the argument (its **kwargs go to the hub upload).
    if "safe_serialization" in inspect.signature(module.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    module.save_pretrained(folder, **kwargs)


def save_diffusers_folder(
    output_dir: str | os.PathLike,
    base_folder: str | os.PathLike,
    trained: Mapping[str, Any],
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write base_folder with the `trained` components (name -> module with save_pretrained) replaced,
    plus `extra_files` (relative path -> text or bytes), as the diffusers folder output_dir; returns it."""
    out = Path(output_dir).expanduser().absolute()
    base = Path(base_folder).expanduser().absolute()
    if not is_diffusers_folder(base):
        raise UserError(f"{base} is not a diffusers model folder (no model_index.json); cannot save the fine-tuned model beside its parts")
    real_out, real_base = out.resolve(), base.resolve()
    if real_out == real_base or real_base in real_out.parents or real_out in real_base.parents:
        raise UserError(f"output_path {out} overlaps base_model {base}; choose an output folder outside the base model")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_path {out} is an existing file; FINE_TUNE saves a folder there, choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        log.info("removing %s, left by an interrupted save", stale)
        shutil.rmtree(stale, ignore_errors=True)

    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        linked = 0
        for entry in sorted(base.iterdir()):
            # Hidden entries are tool state (.cache/ of a hub download, our own temporaries), not parts.
            if entry.name in trained or entry.name.startswith("."):
                continue
            linked += _copy_tree(entry, tmp / entry.name)
        for name, module in trained.items():
            log.info("saving the trained %s to %s", name, out)
            _save_component(module, tmp / name)
        for rel, data in (extra_files or {}).items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        _fsync_tree(tmp)
        log.info("%d files taken from %s", linked, base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, out)
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}" if out.exists() else None
    try:
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)  # put the previous result back under its name
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
