"""What tests/test_multiprocess_resume.py starts under `accelerate launch` instead of main.py: the
same train command, in which the main process, once the backup of step K is in place, kills the
whole launched job with SIGKILL (the launcher, then every process it started), as a power cut or
`kill -9` of the job would. Linux (/proc). Usage: launched_crash.py K main.py-arguments...
With `fail:K` in place of K, the backup of step K fails instead (a full disk) and the run goes on."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kill_job() -> None:
    """SIGKILL the launcher first (so it cannot end the others more gently), then its other children
    (torch elastic starts each process in a session of its own), then this process."""
    launcher = os.getppid()
    os.kill(launcher, signal.SIGKILL)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher:  # the parent's pid, the 4th field of /proc/PID/stat
            os.kill(int(entry.name), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_job_after_backup(step: int) -> None:
    import core.train.backup as backup

    real = backup.BackupFolder.finish  # where every backup (whole or in shards) is put in place

    def finish(self: Any, written_step: int, *args: Any, **kwargs: Any) -> Path:
        path = real(self, written_step, *args, **kwargs)
        if written_step == step:
            kill_job()
        return path

    backup.BackupFolder.finish = finish


def fail_backup(step: int) -> None:
    """The disk fills up while the main process puts the backup of `step` in place."""
    import errno

    import core.train.backup as backup

    real = backup.sync_file

    def sync_file(path: Path) -> None:
        if f".step-{step:08d}.tmp-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    backup.sync_file = sync_file


if __name__ == "__main__":
    how, _, step = sys.argv[1].rpartition(":")
    fail_backup(int(step)) if how == "fail" else kill_job_after_backup(int(step))
    import main

    sys.exit(main.main(sys.argv[2:]))
