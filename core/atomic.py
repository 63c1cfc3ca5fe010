"""Atomic file writes: every file the app writes goes to a temporary name first, then is renamed.

A crash at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads write files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write data to path through a temporary file in the same folder, fsync it, then rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if os.name == "posix":
            # mkstemp makes the file private (0600); give it the mode a plain open() would, or keep
            # the mode of the file it replaces, so outputs stay readable by the user's other tools.
            try:
                mode = target.stat().st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o666 & ~_UMASK
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return target


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside a folder durable (POSIX); Windows has no directory handles to sync."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=4, ensure_ascii=False) + "\n")
