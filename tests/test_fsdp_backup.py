"""The backups of distributed.strategy FSDP in shards (core/train/fsdp_backup.py), in one process:
the run of an FSDP-strategy config on one process writes the same files a sharded run does (the
two-process kill and resume, and the change of process count, are tests/test_multiprocess_resume.py).
A backup in shards holds no trained.safetensors and no optimizer state in state.pt, is checked by its
checksums, resumes to the uninterrupted result, is read whole for samples and the search for a
finite backup, and a shard that cannot be written stops the run with one line, the older backup kept.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_faults_backups import Logs, config_for, setup  # noqa: F401 - setup is a fixture used by name

from core.errors import UserError
from core.train.backup import STATE_FILE, TRAINED_FILE, BackupFolder, damage
from core.train.fsdp_backup import is_sharded, read_trained, trained_names
from core.train.output_guard import newest_finite_backup
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fsdp_config(setup: tuple[Path, Path], root: Path, **overrides: Any) -> dict[str, Any]:
    # FSDP refuses EMA, validation and samples (fsdp_refusals); on one process it does not shard.
    return config_for(setup, root, distributed={"strategy": "FSDP"}, ema={"enabled": False}, sampling={"prompts": []},
                      **overrides)


@pytest.fixture(scope="module")
def uninterrupted(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsdp-runs") / "whole"
    assert Trainer(fsdp_config(setup, root)).run().steps == 5
    return root


def test_the_backup_holds_shards_with_checksums_and_no_whole_state(uninterrupted: Path) -> None:
    backups = BackupFolder(uninterrupted / "workspace")
    assert [b.step for b in backups.complete()] == [2, 4]
    backup = backups.newest()
    names = sorted(p.name for p in backup.path.iterdir())
    assert is_sharded(backup.path) and TRAINED_FILE not in names
    assert {".metadata", "__0_0.distcp", STATE_FILE} <= set(names), names
    assert set(backup.info["files"]) == set(names) - {"backup.json"}
    assert damage(backup) is None
    state = torch.load(backup.path / STATE_FILE, weights_only=True)
    assert "optimizer" not in state and {"scheduler", "rng"} <= set(state)
    # The weights read whole in one process: the LoRA layers, as trained (float32).
    trained = read_trained(backup.path)
    assert trained and set(trained) == set(trained_names(backup.path))
    assert all(k.startswith("transformer/") and "lora_" in k and v.dtype == torch.float32 for k, v in trained.items())


def test_a_damaged_shard_is_told_by_name(uninterrupted: Path, tmp_path: Path) -> None:
    shutil.copytree(uninterrupted / "workspace", tmp_path / "workspace")
    backup = BackupFolder(tmp_path / "workspace").newest()
    shard = backup.path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert damage(backup) == "__0_0.distcp does not hold the bytes that were written (its sha256 differs)"


def test_a_run_resumed_from_a_backup_in_shards_ends_as_the_uninterrupted_run(
        setup: tuple[Path, Path], uninterrupted: Path, tmp_path: Path) -> None:
    shutil.copytree(uninterrupted / "workspace", tmp_path / "workspace")
    logs = Logs()
    result = Trainer(fsdp_config(setup, tmp_path), logs, resume=True).run()
    assert result.resumed_from == 4 and result.steps == 5
    reference = load_file(uninterrupted / "out" / "lora.safetensors")
    resumed = load_file(tmp_path / "out" / "lora.safetensors")
    assert reference.keys() == resumed.keys() and reference
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_the_search_for_a_finite_backup_reads_the_shards(uninterrupted: Path, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    shutil.copytree(uninterrupted / "workspace", tmp_path / "workspace")
    backups = BackupFolder(tmp_path / "workspace")
    assert newest_finite_backup(backups).step == 4
    newest = backups.newest().path
    diverged = {name: torch.full_like(value, float("nan")) for name, value in read_trained(newest).items()}
    for stale in newest.iterdir():
        if stale.name.endswith(".distcp") or stale.name == ".metadata":
            stale.unlink()
    dcp.save({"trained": diverged}, storage_writer=dcp.FileSystemWriter(str(newest)), no_dist=True)
    assert newest_finite_backup(backups).step == 2


def test_a_shard_that_cannot_be_written_stops_the_run_and_keeps_the_older_backup(
        setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint.filesystem as dcp_files

    real = dcp_files._write_item

    def write_item(*args: Any, **kwargs: Any) -> Any:
        if any(".step-00000004.tmp-" in str(getattr(a, "name", "")) for a in args):  # the shard file's stream
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(dcp_files, "_write_item", write_item)
    backups = BackupFolder(tmp_path / "workspace")
    with pytest.raises(UserError) as failed:
        Trainer(fsdp_config(setup, tmp_path, backup={"every_n_steps": 2, "keep": 1}), Logs()).run()
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"could not write the backup {backups.root / 'step-00000004'} (set by workspace_dir): "
                              "the disk is full"), message
    assert "the run stopped after step 4: the backup of step 2 is kept" in message
    assert [b.step for b in backups.complete()] == [2] and damage(backups.newest()) is None
    assert not [p.name for p in backups.root.iterdir() if p.name.startswith(".")], "the half-built backup is removed"


def test_shards_the_main_process_does_not_see_are_refused_naming_shared_storage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.train.fsdp_backup as fsdp_backup
    from core.train.backup import file_record
    from core.train.fsdp_backup import _finish

    monkeypatch.setattr(fsdp_backup, "SHARED_STORAGE_WAIT_SECONDS", 0.0)  # not a network file system's delay

    backups = BackupFolder(tmp_path / "workspace")
    folder = backups.begin(4)
    (folder / ".metadata").write_bytes(b"m")
    (folder / "__0_0.distcp").write_bytes(b"shard 0")
    mine = {"__0_0.distcp": file_record(folder / "__0_0.distcp")}
    elsewhere = {"__1_0.distcp": {"bytes": 7, "sha256": "0" * 64}}  # written on another machine's disk
    with pytest.raises(UserError, match=r"process 1 wrote .* not in .* as the main process sees it: .* workspace_dir must be "
                                        r"a folder every machine sees \(shared storage"):
        _finish(backups, 4, folder, [mine, elsewhere], {"scheduler": {}}, {"format": 2})
    assert not folder.exists() and backups.complete() == []


def test_a_shard_that_shows_late_as_on_a_network_file_system_is_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import core.train.fsdp_backup as fsdp_backup
    from core.train.backup import file_record
    from core.train.fsdp_backup import _finish

    monkeypatch.setattr(fsdp_backup, "SHARED_STORAGE_WAIT_SECONDS", 20.0)
    backups = BackupFolder(tmp_path / "workspace")
    folder = backups.begin(4)
    (folder / ".metadata").write_bytes(b"m")
    (folder / "__0_0.distcp").write_bytes(b"shard 0")
    mine = {"__0_0.distcp": file_record(folder / "__0_0.distcp")}
    late = threading.Timer(0.5, lambda: (folder / "__1_0.distcp").write_bytes(b"shard 1"))
    late.start()
    other = {"__1_0.distcp": {"bytes": 7, "sha256": "0" * 64}}
    path = _finish(backups, 4, folder, [mine, other], {"scheduler": {}}, {"format": 2})
    late.join()
    assert path == backups.final(4) and (path / "__1_0.distcp").read_bytes() == b"shard 1"
    assert set(BackupFolder(tmp_path / "workspace").newest().info["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp", STATE_FILE}
