"""One run at a time in a workspace: the lock a run holds on workspace_dir/workspace.lock.

Two runs in one workspace would delete each other's backups and mix their metrics, so a run takes
this lock before anything else and holds it to its end; a second run is refused in one line naming
the running one (pid, host, start time, command).

- **An OS lock on the open file** (flock on POSIX, msvcrt.locking on Windows). The kernel drops it
  when its holder dies, however it dies (kill -9 included), so a lock left by a killed run is free
  by construction; the next run takes it over and says so.
- **A JSON body** in the file names the owner, for the refusal and that log line.
- **Forked children close their copy** of the descriptor (os.register_at_fork): an orphaned
  data-loading worker of a killed run must not keep the workspace locked.
- **File systems without OS locks** (some network shares) fall back to the body alone: its owner
  holds the workspace while a process with its pid runs on this host with the same start time
  (psutil), so a pid reused by another process does not count.
- **Several processes** (accelerate launch): only the main one (RANK 0) takes the lock; the others
  work under it and must not be refused by it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import explained_write_errors
from core.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "workspace.lock"
_WINDOWS_LOCK_OFFSET = 2**20  # the byte locked on Windows: past the body, which stays readable
_BODY_LIMIT = 64 * 1024
# An OS that cannot lock files there answers with one of these (NFS without a lock daemon, FUSE).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

_HELD: set[int] = set()  # descriptors of the locks this process holds


def _forget_in_child() -> None:
    # Only the descriptor is closed: the lock belongs to the open file, which the parent still holds.
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@dataclass(frozen=True)
class Owner:
    """The process that holds (or held) a workspace lock, as its lock file names it."""

    pid: int
    host: str
    started: float  # the process's start time (seconds since the epoch), to tell a reused pid
    command: str

    @classmethod
    def this_process(cls) -> Owner:
        command = shlex.join(sys.argv)
        if sys.argv and Path(sys.argv[0]).name == "main.py" and sys.argv[1:2] in ([], ["gui"]):
            command += " (the window)"  # main.py without a command opens the window
        return cls(os.getpid(), socket.gethostname(), _start_time(os.getpid()) or time.time(), command)

    @classmethod
    def from_body(cls, body: bytes) -> Owner | None:
        try:
            data = json.loads(body.decode("utf-8"))
            return cls(int(data["pid"]), str(data["host"]), float(data["started"]), str(data["command"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # empty (free), torn, or not ours

    def body(self) -> bytes:
        return (json.dumps({"pid": self.pid, "host": self.host, "started": self.started, "command": self.command,
                            "started_at": _shown_time(self.started)}) + "\n").encode("utf-8")

    def describe(self) -> str:
        command = self.command if len(self.command) <= 200 else self.command[:197] + "..."
        return f"pid {self.pid} on {self.host}, started {_shown_time(self.started)}, command {command!r}"

    def alive(self) -> bool:
        """Whether this owner still runs. On another host it cannot be told, so it counts as running."""
        if self.host != socket.gethostname():
            return True
        started = _start_time(self.pid)
        if started is None:
            return _pid_exists(self.pid)
        return abs(started - self.started) < 1.0  # else the pid now belongs to another process


def _shown_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _start_time(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return -1.0  # gone: matches no owner
    except psutil.Error:
        return None


def _pid_exists(pid: int) -> bool:
    if os.name != "posix":
        return True  # without psutil, Windows gives no cheap answer: err on the side of refusing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the OS lock -----------------------------------------------------------------------------------
def _try_lock(fd: int) -> bool | None:
    """True when this process now holds the lock, False when another holds it, None when the file
    system cannot lock files."""
    try:
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _NO_LOCKS:
            return None
        if isinstance(e, BlockingIOError) or e.errno in (errno.EACCES, errno.EAGAIN, getattr(errno, "EDEADLOCK", -1)):
            return False
        raise
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_body(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, _BODY_LIMIT)


def _write_body(fd: int, body: bytes) -> None:
    # Written in place, not through a temporary name: the lock belongs to this file, and a rename
    # would put another, unlocked file under its name. The body only names the owner; a torn one
    # (a crash mid-write, which also frees the lock) reads as "an unknown process".
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, body)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the name still leads to the open file: a run ending meanwhile removes its lock file,
    and a lock on the removed file would lock nothing."""
    try:
        mine, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


class WorkspaceLock:
    """The lock of one workspace folder; acquire() before the run touches it, release() after."""

    def __init__(self, workspace: str | os.PathLike) -> None:
        self.workspace = Path(workspace).expanduser()
        self.path = self.workspace / LOCK_FILE
        self._fd: int | None = None
        self._pid = os.getpid()
        self._created: list[Path] = []

    def acquire(self, on_log: Callable[[int, str], None] | None = None) -> WorkspaceLock:
        """Take the lock, or raise UserError naming the run that holds it. A lock left by a run that
        ended without releasing it (killed) is taken over, with a log line naming that run."""
        say = on_log or (lambda level, message: log.log(level, message))
        with explained_write_errors(self.path, "the workspace lock", key="workspace_dir"):
            self._created = _make_folders(self.workspace)
            fd, locked = self._open_locked()
            try:
                previous = Owner.from_body(_read_body(fd))
                if locked is False or (locked is None and previous is not None and previous.alive()):
                    raise self._refusal(previous)
                _write_body(fd, Owner.this_process().body())
            except BaseException:
                if locked:  # ours (a body that could not be written): leave no empty lock file behind
                    self.path.unlink(missing_ok=True)
                os.close(fd)
                self._remove_created()
                raise
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(fd)
        if locked is None:
            say(logging.WARNING, f"the file system of {self.workspace} cannot lock files; {self.path} names this run, "
                "but two runs started at the same moment might not see each other")
        if previous is not None:
            say(logging.INFO, f"the workspace lock of an earlier run that did not end cleanly ({previous.describe()}) "
                f"was taken over: {self.path}")
        return self

    def _open_locked(self) -> tuple[int, bool | None]:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
            try:
                locked = _try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if locked and not _same_file(fd, self.path):
                os.close(fd)  # the run that held it ended and removed the file: lock the new one
                continue
            return fd, locked
        raise UserError(f"could not take the workspace lock {self.path}: other runs keep starting and ending there; "
                        "start one run at a time in this workspace_dir")

    def _refusal(self, owner: Owner | None) -> UserError:
        who = owner.describe() if owner is not None else f"a process that {self.path} does not name"
        gone = ""
        if owner is not None and not owner.alive():
            gone = ("; that process has ended, but one it started still holds the lock file open: "
                    f"end it (on Linux: fuser {shlex.quote(str(self.path))})")
        return UserError(f"the workspace {self.workspace} is in use by another run ({who}){gone}; wait for it to end "
                         "or stop it, or choose another workspace_dir")

    def release(self) -> None:
        """Give the lock back and remove the lock file (and the workspace folder, if this lock made
        it and nothing else was written there). Does nothing in a forked child."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._pid:
            return
        _HELD.discard(fd)
        try:
            if os.name == "nt":
                _write_body(fd, b"")  # Windows cannot remove a file another process holds open
                _unlock(fd)
            else:
                # Removed while still locked: a run that opened the file meanwhile finds, once it gets
                # the lock, that the name leads elsewhere, and starts over (_same_file).
                self.path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove the workspace lock %s (%s); the next run takes it over", self.path, e)
        finally:
            os.close(fd)
        if os.name == "nt":
            try:
                self.path.unlink()
            except OSError:
                pass  # another run is opening it; it takes the lock over
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break  # something was written there: keep it, and the folders above it
        self._created = []

    def __enter__(self) -> WorkspaceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it made, outermost first."""
    missing = []
    current = folder
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


class _NoLock:
    def release(self) -> None:
        pass


def hold_workspace(config: dict[str, Any], on_log: Callable[[int, str], None] | None = None) -> WorkspaceLock | _NoLock:
    """The run's workspace lock, taken: by the main process only (RANK 0, or no launcher). Processes
    of a multi-process run other than the main one work under the main one's lock."""
    workspace = str(config.get("workspace_dir") or "").strip()
    if int(os.environ.get("RANK", "0") or 0) != 0 or not workspace:
        return _NoLock()  # an empty workspace_dir is refused by the run's own checks, by name
    return WorkspaceLock(workspace).acquire(on_log)
