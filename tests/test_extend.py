"""A finished run trained further: max_steps raised and the run continued from its newest backup
(core/train/extend.py; docs/long-runs.md, "Extending a run")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_main
from media_factory import make_clip
from safetensors.torch import load_file

from core.config import load_preset, resolve
from core.errors import UserError
from core.train.events import TrainerCallbacks
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md


@pytest.fixture(scope="module")
def tiny_wan(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan21")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for i, caption in enumerate(["a square moving across the frame", "a circle at rest"]):
        make_clip(folder / f"clip{i}.mp4", width=64, height=64, fps=16, seconds=1.0)
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
        "backup": {"every_n_steps": 2, "keep": 2},
        "dataloader_threads": 0,
        "max_steps": 4,
        "warmup_steps": 2,
        "lr_scheduler": "CONSTANT",
        "learning_rate": 0.002,
        "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.1},
    }
    config = resolve(dict(load_preset("#demo tiny wan LoRA")), overlay)
    config.update(overrides)
    return config


class Logs(TrainerCallbacks):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_log(self, level: int, message: str) -> None:
        if level >= logging.INFO:
            self.lines.append(message)


def assert_same(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0, msg=key)


def test_a_constant_run_extended_equals_the_longer_run(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    whole = Trainer(config_for(tiny_wan, clips, tmp_path / "whole", max_steps=8)).run()
    assert whole.steps == 8
    root = tmp_path / "extended"
    first = Trainer(config_for(tiny_wan, clips, root)).run()
    assert first.steps == 4 and not first.stopped_early
    logs = Logs()
    second = Trainer(config_for(tiny_wan, clips, root, max_steps=8), logs, resume=True).run()
    assert second.resumed_from == 4 and second.steps == 8 and second.total_steps == 8
    assert any("extended from 4 to 8 steps and continues at step 4: the CONSTANT learning rate goes on as it was" in line
               for line in logs.lines), logs.lines
    assert_same(root / "out" / "lora.safetensors", tmp_path / "whole" / "out" / "lora.safetensors")
    mine, theirs = read_metrics(root / "workspace"), read_metrics(tmp_path / "whole" / "workspace")
    assert [r["step"] for r in mine] == list(range(1, 9))
    assert [(r["loss"], r["lr"], r["loss_smoothed"]) for r in mine] == [(r["loss"], r["lr"], r["loss_smoothed"]) for r in theirs]
    # The final loss is the smoothed one, as the progress bar shows it.
    assert second.final_loss == mine[-1]["loss_smoothed"] == whole.final_loss


def test_a_linear_run_extended_follows_the_longer_schedule_from_its_step(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    Trainer(config_for(tiny_wan, clips, tmp_path / "whole", max_steps=8, lr_scheduler="LINEAR")).run()
    root = tmp_path / "extended"
    Trainer(config_for(tiny_wan, clips, root, lr_scheduler="LINEAR")).run()
    logs = Logs()
    result = Trainer(config_for(tiny_wan, clips, root, max_steps=8, lr_scheduler="LINEAR"), logs, resume=True).run()
    assert result.resumed_from == 4 and result.steps == 8
    line = next(line for line in logs.lines if "extended from 4 to 8" in line)
    # The 4-step schedule ended at 0; the 8-step one is at half the peak at step 4.
    assert "the LINEAR schedule is rebuilt over 8 steps, so the learning rate goes from 0 (the 4-step schedule at step 4) to 0.001" in line
    mine, theirs = read_metrics(root / "workspace"), read_metrics(tmp_path / "whole" / "workspace")
    # From the backup's step on, every step has the longer run's learning rate; before, the shorter one's.
    assert [r["lr"] for r in mine[4:]] == pytest.approx([r["lr"] for r in theirs[4:]], rel=1e-12)
    assert [r["lr"] for r in mine[:4]] != [r["lr"] for r in theirs[:4]]


def test_a_total_below_the_backups_step_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    Trainer(config_for(tiny_wan, clips, tmp_path)).run()
    with pytest.raises(UserError, match="is of step 4, but this run is 3 steps long; set max_steps to 4 or more"):
        Trainer(config_for(tiny_wan, clips, tmp_path, max_steps=3), resume=True).run()


def test_the_cli_continues_a_finished_run_with_a_raised_max_steps(tmp_path: Path) -> None:
    common = ["--preset", "#demo tiny wan LoRA", "--set", f"workspace_dir={tmp_path / 'ws'}",
              "--set", f"cache_dir={tmp_path / 'cache'}", "--set", f"output_path={tmp_path / 'out' / 'lora.safetensors'}",
              "--set", "sampling.every_n_steps=0", "--set", "backup.every_n_steps=3"]
    first = run_main("train", *common, "--set", "max_steps=3", timeout=300)
    assert first.returncode == 0, first.stderr
    assert "finished: 3 of 3 steps, final loss" in first.stdout
    second = run_main("train", *common, "--resume", "--set", "max_steps=5", timeout=300)
    assert second.returncode == 0, second.stderr
    assert "extended from 3 to 5 steps and continues at step 3: the CONSTANT learning rate goes on as it was" in second.stderr
    assert "finished (continued from step 3): 5 of 5 steps, final loss" in second.stdout
    records = read_metrics(tmp_path / "ws")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # The final loss printed is the smoothed loss of the last step, the one the progress bar showed.
    assert f"final loss {records[-1]['loss_smoothed']:.4f}" in second.stdout


def test_a_run_from_the_start_keeps_an_earlier_runs_samples(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    samples = tmp_path / "workspace" / "samples"
    samples.mkdir(parents=True)
    earlier = samples / "step-000100-0-a-red-circle.mp4"
    earlier.write_bytes(b"an earlier run's video")
    logs = Logs()
    Trainer(config_for(tiny_wan, clips, tmp_path, max_steps=2), logs).run()
    kept = list(samples.glob("earlier-*/step-000100-0-a-red-circle.mp4"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"an earlier run's video"
    assert not earlier.exists() and samples.is_dir()
    assert any(f"an earlier run's files were kept as {kept[0].parent}" in line for line in logs.lines), logs.lines
