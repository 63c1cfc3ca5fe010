"""Faults around a run's workspace (issue 13, points 4, 5 and 7): a second run on a workspace is
refused by name and a lock left by a killed run is taken over; a damaged backup is skipped for the
newest intact one; a write that fails names the path and what to do, and the older backups stay.

Runs are the tiny Wan 2.1 model for a few steps; a run beside the test is a real process (forked
from a forkserver with the engine imported). Full disks and read-only file systems are simulated
by writers that raise what the real ones raise (the tests run as root, which chmod does not stop).
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from media_factory import make_clip
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.config import load_preset, resolve
from core.errors import UserError
from core.models.tiny import build_tiny_model
from core.train import workspace_lock
from core.train.backup import INFO_FILE, BackupFolder, damage
from core.train.events import TrainerCallbacks
from core.train.metrics_reader import read_metrics
from core.train.run_backups import backup_to_resume
from core.train.trainer import Trainer
from core.train.workspace_lock import LOCK_FILE, Owner, WorkspaceLock, hold_workspace

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL, fork and the forkserver are POSIX"),
    pytest.mark.usefixtures("one_torch_thread"),
]

WAIT = 120  # seconds at most for a child process to reach a point; never an assertion on time


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    model = build_tiny_model("wan21", root / "wan21")
    clips = root / "clips"
    clips.mkdir()
    for i, caption in enumerate(["a square moving", "a circle at rest"]):
        make_clip(clips / f"clip{i}.mp4", width=64 + 16 * i, height=64, fps=16, seconds=1.0)
        (clips / f"clip{i}.txt").write_text(caption, encoding="utf-8")
    return model, clips


def config_for(setup: tuple[Path, Path], root: Path, **overrides: Any) -> dict[str, Any]:
    model, clips = setup
    overlay = {
        "base_model": str(model),
        "datasets": [{"path": str(clips), "repeats": 1}],
        "workspace_dir": str(root / "workspace"),
        "cache_dir": str(root.parent / "cache"),
        "output_path": str(root / "out" / "lora.safetensors"),
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 2, "keep": 2},
        "dataloader_threads": 0,
        "max_steps": 5,
        "warmup_steps": 1,
        "lr_scheduler": "COSINE",
        # LoRA dropout draws from the global generator: a resume must restore the RNG state too.
        "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.1},
        "ema": {"enabled": True, "decay": 0.8},
    }
    config = resolve(dict(load_preset("#demo tiny wan LoRA")), overlay)
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


class Logs(TrainerCallbacks):
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def on_log(self, level: int, message: str) -> None:
        self.lines.append((level, message))

    def warnings(self) -> list[str]:
        return [m for level, m in self.lines if level >= logging.WARNING]


@pytest.fixture(scope="module")
def runner() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "diffusers", "peft", "accelerate", "core.train.trainer", "fault_child"])
    return context


@pytest.fixture(scope="module")
def uninterrupted(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 5 steps with backups after steps 2 and 4."""
    root = tmp_path_factory.mktemp("runs") / "whole"
    assert Trainer(config_for(setup, root)).run().steps == 5
    assert [b.step for b in BackupFolder(root / "workspace").complete()] == [2, 4]
    return root


def copy_workspace(source: Path, target: Path) -> Path:
    shutil.copytree(source / "workspace", target / "workspace")
    return target / "workspace"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but TensorBoard's, which its writer thread flushes when it likes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "tensorboard" not in p.relative_to(folder).parts}


# --------------------------------------------------------------------------------------------------
# Point 4: the workspace lock


def test_a_second_run_on_a_workspace_is_refused_naming_the_first(runner: Any, setup: tuple[Path, Path], tmp_path: Path) -> None:
    import fault_child

    config = config_for(setup, tmp_path, max_steps=3)
    workspace = Path(config["workspace_dir"])
    reached, go_on = runner.Event(), runner.Event()
    first = runner.Process(target=fault_child.train_waiting, args=(config, 1, reached, go_on))
    first.start()
    try:
        assert reached.wait(WAIT), "the first run did not reach its first step"
        before = snapshot(workspace)
        with pytest.raises(UserError) as refused:
            Trainer(config, Logs()).run()
        message = str(refused.value)
        assert "\n" not in message
        assert f"the workspace {workspace} is in use by another run (pid {first.pid} on {socket.gethostname()}" in message
        assert "started " in message and "command " in message and "workspace_dir" in message
        assert snapshot(workspace) == before, "the refused run changed the first run's files"
    finally:
        go_on.set()
        first.join(WAIT)
        if first.is_alive():
            first.kill()
    assert first.exitcode == 0
    assert [r["step"] for r in read_metrics(workspace / "metrics.jsonl")] == [1, 2, 3]
    assert load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert not (workspace / LOCK_FILE).exists(), "a run that ended removes its lock"


def test_a_lock_left_by_a_killed_run_is_taken_over_even_while_its_forked_worker_lives(runner: Any, tmp_path: Path) -> None:
    import fault_child

    workspace = tmp_path / "workspace"
    held, child_pid = runner.Event(), runner.Value("i", 0)
    killed = runner.Process(target=fault_child.hold_lock, args=(str(workspace), held, True, child_pid))
    killed.start()
    assert held.wait(WAIT)
    worker = child_pid.value
    os.kill(killed.pid, signal.SIGKILL)
    killed.join()
    try:
        # Its forked child (as a data-loading worker) lives on and must not keep the lock.
        assert psutil.pid_exists(worker)
        logs = Logs()
        with WorkspaceLock(workspace).acquire(logs.on_log):
            taken = [m for _, m in logs.lines if "taken over" in m]
            assert len(taken) == 1 and f"pid {killed.pid} on {socket.gethostname()}" in taken[0], logs.lines
            assert Owner.from_body((workspace / LOCK_FILE).read_bytes()).pid == os.getpid()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_without_os_locks_the_owner_is_told_by_its_pid_and_start_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace_lock, "_try_lock", lambda fd: None)  # a file system that cannot lock
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        started = psutil.Process(sleeper.pid).create_time()
        host = socket.gethostname()
        (workspace / LOCK_FILE).write_bytes(Owner(sleeper.pid, host, started, "main.py train --resume").body())
        with pytest.raises(UserError, match=rf"in use by another run \(pid {sleeper.pid} on .*'main.py train --resume'"):
            WorkspaceLock(workspace).acquire()
        # The same pid with another start time is another process (the pid was reused); a pid that
        # no longer runs holds nothing.
        for owner in (Owner(sleeper.pid, host, started - 1000, "old"), Owner(ended.pid, host, started, "gone")):
            (workspace / LOCK_FILE).write_bytes(owner.body())
            logs = Logs()
            with WorkspaceLock(workspace).acquire(logs.on_log):
                assert any("taken over" in m and f"pid {owner.pid}" in m for _, m in logs.lines), logs.lines
                assert any("cannot lock files" in m for m in logs.warnings())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_only_the_main_process_of_a_launched_run_takes_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"workspace_dir": str(tmp_path / "workspace")}
    with WorkspaceLock(config["workspace_dir"]).acquire():
        monkeypatch.setenv("RANK", "1")  # another process of the same launch works under the main one's lock
        hold_workspace(config).release()
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match="in use by another run"):
            hold_workspace(config)


# --------------------------------------------------------------------------------------------------
# Point 5: checksums, and resuming from the newest intact backup


def _tensor_data(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of a safetensors file."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return 8 + length, json.loads(raw[8 : 8 + length])


def flip_bytes(path: Path) -> None:
    start, _ = _tensor_data(path)
    raw = bytearray(path.read_bytes())
    middle = (start + len(raw)) // 2
    raw[middle : middle + 4] = bytes(b ^ 0xFF for b in raw[middle : middle + 4])
    path.write_bytes(bytes(raw))


def write_nan(path: Path) -> None:
    """A NaN in the first float32 weight: the file still parses, only the checksum can tell."""
    start, header = _tensor_data(path)
    name, entry = next((k, v) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    raw = bytearray(path.read_bytes())
    offset = start + entry["data_offsets"][0]
    raw[offset : offset + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    assert torch.isnan(load_file(str(path))[name]).any()


DAMAGE = {
    "flipped bytes in the weights": ("trained.safetensors", flip_bytes, "sha256 differs"),
    "a NaN in the weights that still parses": ("trained.safetensors", write_nan, "sha256 differs"),
    "unreadable safetensors": ("ema.safetensors", lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "sha256 differs"),
    "a truncated state.pt": ("state.pt", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "bytes, not the "),
    "a missing file": ("ema.safetensors", lambda p: p.unlink(), "ema.safetensors is missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_backup_is_skipped_by_name(kind: str, uninterrupted: Path, tmp_path: Path) -> None:
    name, harm, reason = DAMAGE[kind]
    backups = BackupFolder(copy_workspace(uninterrupted, tmp_path))
    newest = backups.newest()
    assert damage(newest) is None
    harm(newest.path / name)
    logs = Logs()
    chosen = backup_to_resume(backups, logs.on_log)
    assert chosen.step == 2
    [warning] = logs.warnings()
    assert f"the backup {newest.path} is damaged (" in warning and reason in warning and "trying the one before it" in warning


def test_resume_continues_from_the_newest_intact_backup_and_ends_as_the_uninterrupted_run(
        setup: tuple[Path, Path], uninterrupted: Path, tmp_path: Path) -> None:
    workspace = copy_workspace(uninterrupted, tmp_path)
    flip_bytes(workspace / "backups" / "step-00000004" / "trained.safetensors")
    logs = Logs()
    result = Trainer(config_for(setup, tmp_path), logs, resume=True).run()
    assert result.resumed_from == 2 and result.steps == 5
    assert any("step-00000004 is damaged" in w for w in logs.warnings())
    for file in ("lora.safetensors", "lora-ema.safetensors"):
        mine, theirs = load_file(str(tmp_path / "out" / file)), load_file(str(uninterrupted / "out" / file))
        assert mine.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=f"{file}: {key}")
    # The damaged backup of step 4 was replaced by the resumed run's own.
    assert [b.step for b in BackupFolder(workspace).complete()] == [2, 4]
    assert damage(BackupFolder(workspace).newest()) is None


def test_no_intact_backup_is_said_in_one_line(setup: tuple[Path, Path], uninterrupted: Path, tmp_path: Path) -> None:
    workspace = copy_workspace(uninterrupted, tmp_path)
    for backup in BackupFolder(workspace).complete():
        flip_bytes(backup.path / "trained.safetensors")
    with pytest.raises(UserError) as refused:
        Trainer(config_for(setup, tmp_path), Logs(), resume=True).run()
    message = str(refused.value)
    assert "\n" not in message
    assert f"no backup in {workspace / 'backups'} is intact (2 damaged" in message and "without --resume" in message


def test_a_backup_of_format_1_without_checksums_is_checked_by_loading_it(uninterrupted: Path, tmp_path: Path) -> None:
    backups = BackupFolder(copy_workspace(uninterrupted, tmp_path))
    for backup in backups.complete():  # as the version before checksums wrote them
        info = {k: v for k, v in backup.info.items() if k != "files"}
        (backup.path / INFO_FILE).write_text(json.dumps({**info, "format": 1}), encoding="utf-8")
    logs = Logs()
    assert backup_to_resume(backups, logs.on_log).step == 4 and not logs.warnings()
    trained = backups.newest().path / "trained.safetensors"
    trained.write_bytes(trained.read_bytes()[:100])
    assert backup_to_resume(backups, logs.on_log).step == 2
    [warning] = logs.warnings()
    assert "step-00000004 is damaged (its files cannot be read: SafetensorError" in warning
    # A format-2 backup whose checksums were taken out of backup.json is damaged, not old.
    newest = backups.newest()
    (newest.path / INFO_FILE).write_text(json.dumps({**newest.info, "format": 2}), encoding="utf-8")
    assert "lists no checksums" in damage(backups.newest())


# --------------------------------------------------------------------------------------------------
# Point 7: failed writes


def _in_backup_of_step_4(path: Any) -> bool:
    return ".step-00000004.tmp-" in str(path)


def _fail_safetensors(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
        if not _in_backup_of_step_4(filename):
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\0" * 100)  # a part was written when the disk filled up
        raise SafetensorError(text)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _fail_torch_save(monkeypatch: pytest.MonkeyPatch, *_: Any) -> None:
    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not _in_backup_of_step_4(f):
            return real(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\3\4" + b"\0" * 60)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5184 vs 5072")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", save)
    # torch's message names neither the file nor the errno; a nearly full disk tells it apart.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))


def _fail_read_only(monkeypatch: pytest.MonkeyPatch, *_: Any) -> None:
    import core.train.backup as backup_module

    real = backup_module.write_file_synced

    def write(path: Path, data: bytes) -> None:
        if _in_backup_of_step_4(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real(path, data)

    monkeypatch.setattr(backup_module, "write_file_synced", write)


# What safetensors 0.8 says on a full disk (seen on a full tmpfs), and the io::Error's Debug form.
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
SAFETENSORS_FULL_DEBUG = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.mark.parametrize("fault, advice", [
    (lambda m: _fail_safetensors(m, SAFETENSORS_FULL), "the disk is full; free space on it"),
    (lambda m: _fail_safetensors(m, SAFETENSORS_FULL_DEBUG), "the disk is full; free space on it"),
    (_fail_torch_save, "the disk is full; free space on it"),
    (_fail_read_only, "the file system is read-only"),
], ids=["safetensors, disk full", "safetensors, disk full (Debug text)", "torch.save, disk full", "read-only"])
def test_a_failed_backup_names_it_stops_the_run_and_keeps_the_older_one(
        fault: Any, advice: str, setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # keep 1: a backup of step 4 that had been written would prune the one of step 2.
    config = config_for(setup, tmp_path, backup={"every_n_steps": 2, "keep": 1})
    backups = BackupFolder(config["workspace_dir"])
    kept: dict[str, bytes] = {}

    class Watch(Logs):
        def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float) -> None:
            if step == 4:  # just before the backup of step 4: what the older backup holds
                kept.update(snapshot(backups.root / "step-00000002"))

    fault(monkeypatch)
    with pytest.raises(UserError) as failed:
        Trainer(config, Watch()).run()
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"could not write the backup {backups.root / 'step-00000004'} (set by workspace_dir): {advice}")
    assert "the run stopped after step 4: the backup of step 2 is kept, continue from it with --resume" in message
    assert [b.step for b in backups.complete()] == [2]
    assert kept and snapshot(backups.root / "step-00000002") == kept and damage(backups.newest()) is None
    assert not [p.name for p in backups.root.iterdir() if p.name.startswith(".")], "the half-built backup is removed"


def _raises(error: OSError) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


# As os.write says a full disk: no file name; the message must supply the path.
DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


def test_a_cache_entry_that_cannot_be_written_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.data.cache as cache_module
    from core.data.cache import LatentCache

    monkeypatch.setattr(cache_module, "write_bytes_atomic", _raises(DISK_FULL))
    cache = LatentCache(tmp_path / "cache")
    with pytest.raises(UserError, match=rf"^could not write the cache entry {tmp_path / 'cache' / 'latents'}/0+\.safetensors "
                       r"\(set by cache_dir\): the disk is full"):
        cache.put("0" * 64, {"latents": torch.zeros(2)})


def test_a_run_record_that_cannot_be_written_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.train.run_info as run_info

    path = tmp_path / "ws" / "run_info.json"
    monkeypatch.setattr(run_info, "write_json_atomic", _raises(OSError(errno.EROFS, "Read-only file system", str(path))))
    with pytest.raises(UserError, match=rf"^could not write the run record {path} \(set by workspace_dir\): the file system is read-only"):
        run_info.write_run_info(tmp_path / "ws", {}, {})


def test_metrics_that_cannot_be_written_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import core.train.telemetry as telemetry

    path = tmp_path / "ws" / "metrics.jsonl"
    # At the start: the run does not begin.
    monkeypatch.setattr(telemetry, "open", _raises(PermissionError(errno.EACCES, "Permission denied", str(path))), raising=False)
    with pytest.raises(UserError, match=rf"^could not write the metrics {path} \(set by workspace_dir\): permission denied"):
        telemetry.MetricsWriter(tmp_path / "ws", tensorboard=False)
    monkeypatch.undo()
    # During the run: a warning, once, and training goes on.
    writer = telemetry.MetricsWriter(tmp_path / "ws", tensorboard=False)

    class FullFile:
        write = _raises(DISK_FULL)
        flush = close = lambda self: None

    writer._file = FullFile()
    with caplog.at_level(logging.WARNING):
        writer.write({"step": 1, "loss": 0.5})
    assert f"could not write the metrics {path} (set by workspace_dir): the disk is full" in caplog.text


def test_a_sample_that_cannot_be_written_names_it_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    import core.export.video_file as video_file
    from core.config.settings import defaults
    from core.train.samples import SampleMaker

    from core.models.frame_rule import FrameRule

    class Adapter:  # draws a tiny video; writing its file fails
        frame_rule = FrameRule(step=4)  # a video model's (4k + 1)

        def sample(self, denoisers: Any, request: Any, **kwargs: Any) -> Any:
            return np.zeros((3, 16, 16, 3), np.uint8)

        def unload_encoders(self) -> None:
            pass

    config = defaults()
    config["sampling"].update(prompts=["a red square"], width=16, height=16, frames=3)
    monkeypatch.setattr(video_file, "write_bytes_atomic", _raises(DISK_FULL))
    with caplog.at_level(logging.WARNING):
        assert SampleMaker(Adapter(), config, tmp_path / "ws", "cpu", torch.float32).make(5, {}) == []
    assert (f"could not write the sample video {tmp_path / 'ws' / 'samples' / 'step-000005-0-a-red-square.mp4'} "
            "(set by workspace_dir): the disk is full") in caplog.text


def test_a_workspace_lock_that_cannot_be_written_names_it_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace_lock, "_write_body", _raises(DISK_FULL))
    with pytest.raises(UserError, match=rf"^could not write the workspace lock {tmp_path / 'full' / 'ws' / LOCK_FILE} "
                       r"\(set by workspace_dir\): the disk is full"):
        WorkspaceLock(tmp_path / "full" / "ws").acquire()
    assert not (tmp_path / "full").exists(), "a lock that could not be written leaves no file or folder behind"
    read_only = tmp_path / "ro"
    monkeypatch.setattr(workspace_lock, "_make_folders", _raises(OSError(errno.EROFS, "Read-only file system", str(read_only))))
    with pytest.raises(UserError, match=rf"^could not write the workspace lock {read_only} \(set by workspace_dir\): "
                       "the file system is read-only"):
        WorkspaceLock(read_only).acquire()
