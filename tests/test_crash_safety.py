"""Crash safety: a run killed with SIGKILL at any moment (in a step, while writing a backup, while
saving) and continued with resume ends with the LoRA of a run that was never interrupted, and after
every kill the newest complete backup loads and no half-written file stands where a result belongs.

Runs are real processes (forked from a forkserver that has the engine imported, so each starts in
about a second), killed by the test after a random delay, or by themselves inside the n-th fsync:
after a file's bytes are written and before it is renamed into place, the worst moment for a write.
"""

from __future__ import annotations

import multiprocessing
import random
import sys
from pathlib import Path

import pytest
import torch
from media_factory import make_clip
from safetensors.torch import load_file

from core.config import load_preset, resolve
from core.models.tiny import build_tiny_model
from core.train.backup import BackupFolder
from core.train.resume import read_backup

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and the forkserver are POSIX")

STEPS = 10


@pytest.fixture(scope="module")
def runner():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "diffusers", "peft", "accelerate", "core.train.trainer", "crash_child"])
    return context


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("crash")
    model = build_tiny_model("wan21", root / "wan21")
    clips = root / "clips"
    clips.mkdir()
    for i, caption in enumerate(["a square moving", "a circle at rest"]):
        make_clip(clips / f"clip{i}.mp4", width=64 + 16 * i, height=64, fps=16, seconds=1.0)
        (clips / f"clip{i}.txt").write_text(caption, encoding="utf-8")
    return model, clips


def config_for(setup: tuple[Path, Path], root: Path) -> dict:
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
        "max_steps": STEPS,
        "warmup_steps": 3,
        "lr_scheduler": "COSINE",
        "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.1},
        "ema": {"enabled": True, "decay": 0.8},
    }
    return resolve(dict(load_preset("#demo tiny wan LoRA")), overlay)


def run(runner, config: dict, *, resume: bool, fsync_kill: int | None = None, kill_after: float | None = None,
        backup_kill: int | None = None) -> int:
    import crash_child

    process = runner.Process(target=crash_child.train, args=(config, resume, fsync_kill, backup_kill))
    process.start()
    process.join(kill_after)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def check_nothing_half_written(root: Path) -> None:
    """What a killed run leaves: every backup folder complete and loadable, the result either absent
    or whole."""
    for backup in BackupFolder(root / "workspace").complete():
        trained, state, ema = read_backup(backup)
        assert trained and "optimizer" in state and ema is not None, backup.path
    output = root / "out" / "lora.safetensors"
    if output.exists():
        load_file(str(output))


def test_killed_runs_resume_to_the_uninterrupted_result(runner, setup: tuple[Path, Path], tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert run(runner, config_for(setup, whole), resume=False) == 0
    reference = load_file(str(whole / "out" / "lora.safetensors"))

    # Three interrupted histories, each killed again and again until it finishes: inside fsyncs
    # (backup files, the final save) and at random moments of the steps.
    rng = random.Random(1234)
    for history in range(3):
        root = tmp_path / f"history{history}"
        config = config_for(setup, root)
        kills, resume = 0, False
        while True:
            # The first run always dies (a run from the start does more than 12 fsyncs); then kills
            # at random moments, which a short resumed run may outlive; then one run to the end.
            mode = "fsync" if kills == 0 else rng.choice(["fsync", "time"]) if kills < 5 else "none"
            if mode == "fsync":
                code = run(runner, config, resume=resume, fsync_kill=rng.randint(1, 12))
            elif mode == "time":
                code = run(runner, config, resume=resume, kill_after=rng.uniform(0.5, 4.0))
            else:
                code = run(runner, config, resume=resume)
            if code == 0:
                break
            assert code == -9, f"the run failed rather than being killed (exit code {code})"
            kills += 1
            check_nothing_half_written(root)
            resume = BackupFolder(root / "workspace").newest() is not None
        assert kills > 0, "the schedule must interrupt every history at least once"
        result = load_file(str(root / "out" / "lora.safetensors"))
        assert result.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(result[key], reference[key], rtol=0, atol=0, msg=f"history {history}: {key}")
    # No temporary backup folder survives a finished run.
    assert not [p for p in (root / "workspace" / "backups").iterdir() if p.name.startswith(".")]


def test_a_kill_while_a_backup_is_written_leaves_the_previous_one(runner, setup: tuple[Path, Path], tmp_path: Path) -> None:
    config = config_for(setup, tmp_path)
    config["max_steps"] = 6
    # Killed after the first file of the backup of step 6 is written: the backups of steps 2 and 4
    # are whole, and the half-built one sits under its temporary name only.
    assert run(runner, config, resume=False, backup_kill=6) == -9
    backups = BackupFolder(tmp_path / "workspace")
    assert [b.step for b in backups.complete()] == [2, 4]
    assert [p for p in backups.root.iterdir() if p.name.startswith(".step-00000006.tmp-")]
    check_nothing_half_written(tmp_path)
    # The next run continues from step 4 and clears the leftover when it writes its own backup.
    assert run(runner, config, resume=True) == 0
    assert [b.step for b in backups.complete()] == [4, 6]
    assert not [p for p in backups.root.iterdir() if p.name.startswith(".")]
