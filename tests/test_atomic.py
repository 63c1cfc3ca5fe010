"""Atomic writes: the file appears whole or not at all, with the permissions a normal write gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from core.atomic import write_bytes_atomic, write_json_atomic


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path: Path) -> None:
    fresh = write_bytes_atomic(tmp_path / "new.bin", b"data")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")  # what open() gives under this process's umask
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    os.chmod(fresh, 0o640)
    write_bytes_atomic(fresh, b"more")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_bytes() == b"more"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_json_atomic(tmp_path / "a.json", {"v": 1})

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_json_atomic(target, {"v": 2})
    assert target.read_text(encoding="utf-8").strip().endswith("}") and '"v": 1' in target.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
