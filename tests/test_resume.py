"""Backups and exact resume, in one process: a run stopped and continued from its backup ends with the
weights of a run that was never interrupted, and a backup that does not belong to the run is refused.
(tests/test_crash_safety.py kills real processes.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from media_factory import make_clip
from safetensors.torch import load_file

from core.config import load_preset, resolve
from core.errors import UserError
from core.train.backup import BackupFolder
from core.train.events import TrainerCallbacks, TrainerCommands
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md


@pytest.fixture(scope="module")
def tiny_wan(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan21")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for i, caption in enumerate(["a square moving across the frame", "a circle at rest", "stripes drifting"]):
        make_clip(folder / f"clip{i}.mp4", width=64 + 16 * i, height=64, fps=16, seconds=1.0)
        (folder / f"clip{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def config_for(tiny_wan: Path, data: Path, root: Path, **overrides) -> dict:
    overlay = {
        "base_model": str(tiny_wan),
        "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(root / "workspace"),
        "cache_dir": str(root.parent / "shared-cache"),
        "output_path": str(root / "out" / "lora.safetensors"),
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 3, "keep": 2},
        "dataloader_threads": 0,
        "max_steps": 8,
        "warmup_steps": 2,
        "lr_scheduler": "COSINE",
        "learning_rate": 0.002,
        # LoRA dropout draws from torch's global generator: the RNG state must come back too.
        "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.1},
        "ema": {"enabled": True, "decay": 0.9},
        # One of the three clips is held out and validated every 4 steps (and its watch backed up).
        "validation": {"every_n_steps": 4, "holdout_fraction": 0.34},
    }
    config = resolve(dict(load_preset("#demo tiny wan LoRA")), overlay)
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


class StopAt(TrainerCallbacks):
    def __init__(self, step: int, commands: TrainerCommands) -> None:
        self.step, self.commands = step, commands

    def on_progress(self, step, total_steps, epoch, eta_seconds):
        if step == self.step:
            self.commands.request_stop()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tiny_wan: Path, clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "whole"
    result = Trainer(config_for(tiny_wan, clips, root)).run()
    assert result.steps == 8
    return root


def test_stopped_and_resumed_run_ends_with_the_same_weights(tiny_wan: Path, clips: Path, uninterrupted: Path, tmp_path: Path) -> None:
    root = tmp_path / "split"
    commands = TrainerCommands()
    first = Trainer(config_for(tiny_wan, clips, root), StopAt(5, commands), commands).run()
    assert first.stopped_early and first.steps == 5
    # Backups at 3 (due) and 5 (the stop); keep 2.
    assert [b.step for b in BackupFolder(root / "workspace", 2).complete()] == [3, 5]
    second = Trainer(config_for(tiny_wan, clips, root), resume=True).run()
    assert second.resumed_from == 5 and second.steps == 8 and not second.stopped_early
    assert_same(root / "out" / "lora.safetensors", uninterrupted / "out" / "lora.safetensors")
    assert_same(root / "out" / "lora-ema.safetensors", uninterrupted / "out" / "lora-ema.safetensors")
    # The metrics continue where the backup was made: one record per step, the same losses.
    mine = read_metrics(root / "workspace" / "metrics.jsonl")
    theirs = read_metrics(uninterrupted / "workspace" / "metrics.jsonl")
    assert [r["step"] for r in mine] == list(range(1, 9))
    assert [r["loss"] for r in mine] == [r["loss"] for r in theirs]
    assert [r["lr"] for r in mine] == [r["lr"] for r in theirs]
    # Validation at the configured steps, the same values in both runs (fixed noise and timesteps).
    validated = [(r["step"], r["val_loss"], r["val_loss_q50"]) for r in mine if "val_loss" in r]
    assert [step for step, _, _ in validated] == [4, 8]
    assert validated == [(r["step"], r["val_loss"], r["val_loss_q50"]) for r in theirs if "val_loss" in r]


def test_backup_folder_holds_what_a_resume_needs(uninterrupted: Path) -> None:
    backups = BackupFolder(uninterrupted / "workspace", 2).complete()
    assert [b.step for b in backups] == [3, 6]  # every 3 steps, the newest 2 kept
    newest = backups[-1]
    names = sorted(p.name for p in newest.path.iterdir())
    assert names == ["backup.json", "ema.safetensors", "state.pt", "trained.safetensors"]
    info = json.loads((newest.path / "backup.json").read_text())
    assert info["step"] == 6 and info["settings"]["lora"]["rank"] == 4 and "backup" not in info["settings"]
    assert not [p for p in (uninterrupted / "workspace" / "backups").iterdir() if p.name.startswith(".")]


def test_resume_without_a_backup_says_so(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no backup"):
        Trainer(config_for(tiny_wan, clips, tmp_path / "none"), resume=True).run()


def _copy_run(source: Path, target: Path) -> None:
    import shutil

    shutil.copytree(source / "workspace", target / "workspace")


def test_a_backup_with_other_settings_is_refused_by_name(tiny_wan: Path, clips: Path, uninterrupted: Path, tmp_path: Path) -> None:
    _copy_run(uninterrupted, tmp_path)
    with pytest.raises(UserError, match=r"other settings \(learning_rate was 0.002, now 0.005"):
        Trainer(config_for(tiny_wan, clips, tmp_path, learning_rate=0.005), resume=True).run()
    # Settings that change nothing in the weights may differ (here: how often backups are made).
    result = Trainer(config_for(tiny_wan, clips, tmp_path, backup={"every_n_steps": 4}), resume=True).run()
    assert result.resumed_from == 6 and result.steps == 8


def test_a_backup_of_another_version_or_format_is_refused(tiny_wan: Path, clips: Path, uninterrupted: Path, tmp_path: Path) -> None:
    _copy_run(uninterrupted, tmp_path)
    newest = BackupFolder(tmp_path / "workspace").newest()
    info_path = newest.path / "backup.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "app_version": "0.0.1"}))
    with pytest.raises(UserError, match="made by Video Trainer 0.0.1"):
        Trainer(config_for(tiny_wan, clips, tmp_path), resume=True).run()
    info_path.write_text(json.dumps({**info, "format": 99}))
    with pytest.raises(UserError, match="backup format 99"):
        Trainer(config_for(tiny_wan, clips, tmp_path), resume=True).run()


def test_a_backup_of_other_data_is_refused(tiny_wan: Path, clips: Path, uninterrupted: Path, tmp_path: Path) -> None:
    import shutil

    _copy_run(uninterrupted, tmp_path)
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for name in ("clip0.mp4", "clip0.txt"):
        shutil.copy(clips / name, fewer / name)
    with pytest.raises(UserError, match="other training data"):
        Trainer(config_for(tiny_wan, fewer, tmp_path), resume=True).run()


def test_a_run_from_the_start_keeps_an_earlier_runs_backups_and_metrics(tiny_wan: Path, clips: Path, uninterrupted: Path, tmp_path: Path) -> None:
    _copy_run(uninterrupted, tmp_path)
    Trainer(config_for(tiny_wan, clips, tmp_path, max_steps=3)).run()
    workspace = tmp_path / "workspace"
    earlier = [p for p in (workspace / "backups").iterdir() if p.name.startswith("earlier-")]
    assert len(earlier) == 1 and sorted(p.name for p in earlier[0].iterdir()) == ["step-00000003", "step-00000006"]
    assert [b.step for b in BackupFolder(workspace).complete()] == [3]  # only this run's
    assert [r["step"] for r in read_metrics(workspace / "metrics.jsonl")] == [1, 2, 3]
    assert len(list(workspace.glob("metrics-earlier-*.jsonl"))) == 1


def test_backup_now_writes_a_backup_after_the_current_step(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    commands = TrainerCommands()

    class AskAtOne(TrainerCallbacks):
        def on_progress(self, step, total_steps, epoch, eta_seconds):
            if step == 1:
                commands.request_backup()

    Trainer(config_for(tiny_wan, clips, tmp_path, max_steps=3, backup={"every_n_steps": 0, "keep": 5}), AskAtOne(), commands).run()
    assert [b.step for b in BackupFolder(tmp_path / "workspace").complete()] == [1]


def test_sample_now_without_prompts_says_why_nothing_is_made(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    commands = TrainerCommands()
    warnings: list[str] = []

    class AskAtOne(TrainerCallbacks):
        def on_progress(self, step, total_steps, epoch, eta_seconds):
            if step == 1:
                commands.request_sample()

        def on_log(self, level, message):
            if level >= 30:
                warnings.append(message)

    Trainer(config_for(tiny_wan, clips, tmp_path, max_steps=2, sampling={"prompts": []}), AskAtOne(), commands).run()
    assert any("sampling.prompts is empty" in w for w in warnings), warnings
    assert not (tmp_path / "workspace" / "samples").exists()
