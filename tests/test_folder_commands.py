"""core.train.events.FolderCommands: requests as files from another process (the window's launched run)."""

from __future__ import annotations

from pathlib import Path

from core.train.events import FolderCommands


def test_the_main_process_takes_requests_from_files(tmp_path: Path) -> None:
    commands, other = FolderCommands(tmp_path, main=True), FolderCommands(tmp_path, main=False)
    assert not commands.stop_requested and not commands.take_sample_request() and not commands.take_backup_request()
    (tmp_path / "sample").touch()
    (tmp_path / "backup").touch()
    assert not other.take_sample_request() and not other.take_backup_request()  # only the main process reads
    assert commands.take_sample_request() and not commands.take_sample_request()  # once per request
    assert commands.take_backup_request() and not (tmp_path / "backup").exists()
    assert not commands.wait_for_stop(timeout=0)
    (tmp_path / "stop").touch()
    assert commands.stop_requested and commands.stop_requested  # a stop stays
    assert commands.wait_for_stop(timeout=0) and not other.stop_requested
    # In-process requests still count, as TrainerCommands'.
    other.request_stop()
    assert other.stop_requested
