"""Atomic file writes: every file the app writes goes to a temporary name first, then is renamed.

A crash at any moment leaves either the old file or the new one, never half of one. A write that
fails (a full disk, a read-only file system, no permission) is told in one line that names the path
and what to do (write_failure, explained_write_errors).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import UserError


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


# -- write failures, in words ----------------------------------------------------------------------
# What each errno of a failed write means to the user, and what to do about it.
_WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full; free space on it, or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up; free space in it, or choose a folder on another disk",
    errno.EROFS: "the file system is read-only; choose a folder on a writable disk",
    errno.EACCES: "permission denied; choose a folder you may write to, or change its permissions",
    errno.EPERM: "the operation is not permitted there; choose a folder you may write to",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter name or path",
    errno.EFBIG: "the file is larger than the file system allows (FAT32 holds 4 GB at most); choose a folder on another disk",
    errno.EIO: "the disk reported an input/output error; check the disk, or choose a folder on another one",
}
# Library writers that report a failed write without an errno: torch.save (its zip writer) and
# safetensors (a Rust io::Error, whose OS code is in the text: "... (os error 28)").
_TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|inline_container|file write failed|unexpected pos")
_OS_CODE_IN_TEXT = re.compile(r"(?:code: |\[Errno |os error )(\d+)")
# Below this, a write failure with no errno is most likely a full disk.
_NEARLY_FULL_BYTES = 64 * 2**20


def _errno_of(error: BaseException, path: Path) -> int | None:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    text = str(error)
    match = _OS_CODE_IN_TEXT.search(text)
    if match:
        return int(match.group(1))
    if isinstance(error, RuntimeError) and _TORCH_WRITE_FAILURE.search(text):
        folder = path if path.is_dir() else path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES:
                return errno.ENOSPC
        except OSError:
            pass
        return errno.EIO
    return None


def write_failure(error: BaseException, path: str | os.PathLike, what: str, *, key: str | None = None) -> UserError | None:
    """The one-line UserError for `error` raised while writing `what` (e.g. "the backup") at `path`,
    naming the path and what to do; None when `error` is not a failed write (a bug stays a bug).
    `key` names the setting that chose the location, so the message can say which one to change."""
    if isinstance(error, UserError):
        return None
    where = Path(path)
    code = _errno_of(error, where)
    if code is None or code not in _WRITE_ADVICE:
        if code is None:
            return None
        advice = f"{os.strerror(code)}; check the disk and the folder's permissions"
    else:
        advice = _WRITE_ADVICE[code]
    filename = getattr(error, "filename", None)
    shown = Path(filename) if isinstance(filename, (str, os.PathLike)) and str(filename) else where
    setting = f" (set by {key})" if key else ""
    return UserError(f"could not write {what} {shown}{setting}: {advice}")


@contextlib.contextmanager
def explained_write_errors(path: str | os.PathLike, what: str, *, key: str | None = None) -> Iterator[None]:
    """Turn a failed write inside the block into write_failure's one line; other errors pass."""
    try:
        yield
    except Exception as e:
        explained = write_failure(e, path, what, key=key)
        if explained is None:
            raise
        raise explained from e
