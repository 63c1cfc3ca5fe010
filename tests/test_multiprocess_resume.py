"""Exact resume of a run on several processes: a two-process DDP run and a two-process FSDP run are
killed with SIGKILL (the launcher and both processes) after a backup, continued with `--resume`, and
end with the LoRA of the uninterrupted run, bit for bit; the FSDP run's backup is each process's
shards. A backup continues on another number of processes where the global batch (batch_size x
processes) stays the same (an FSDP backup's shards read into one process), and is refused by name
where it would not. A backup the main process cannot write stops both processes, with one line.

The runs go through `accelerate launch` as a user starts them; tests/launched_crash.py is main.py
with the main process killing the job once the backup of step KILL_AFTER is in place. LoRA dropout
is on, so the RNG states each process continues with matter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import (  # noqa: F401 - dataset is a fixture used by name
    MAX_DIFF_TOLERANCE,
    NORM_TOLERANCE,
    _free_port,
    _gloo_starts,
    _rounding_excess,
    _write_config,
    dataset,
)

from core.models.tiny import build_tiny_model
from core.train.metrics_reader import read_metrics

# The one-process comparison depends on float kernels (docs/testing.md); the kill reads /proc.
pytestmark = [pytest.mark.numerics, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the job is killed through /proc")]

ROOT = Path(__file__).resolve().parent.parent
STEPS, KILL_AFTER = 6, 4


@pytest.fixture(scope="module")
def wan21(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("wan21", tmp_path_factory.mktemp("resume-model") / "wan21")


def _config(tmp_path: Path, name: str, model: Path, data: Path, cache: Path, batch_size: int, strategy: str) -> Path:
    path = _write_config(tmp_path / f"{name}.json", model, data, tmp_path / name, cache, batch_size=batch_size)
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(max_steps=STEPS, backup={"every_n_steps": 2, "keep": 3}, distributed={"strategy": strategy},
                  lora={**config["lora"], "dropout": 0.1})
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VIDEO_TRAINER_HOME=str(home), CUDA_VISIBLE_DEVICES="",
               ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return env


def _launch(config: Path, home: Path, *, processes: int = 2, resume: bool = False, kill_after: int | str | None = None) -> subprocess.CompletedProcess:
    script = ["tests/launched_crash.py", str(kill_after)] if kill_after is not None else ["main.py"]
    args = [sys.executable, *script, "train", "--config", str(config)]  # one process: as a user runs it
    if processes > 1:
        args[1:1] = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port())]
    if resume:
        args.append("--resume")
    done = subprocess.run(args, cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=300)
    if done.returncode not in (0, -signal.SIGKILL) and processes > 1:
        reason = _gloo_starts()
        if reason:
            pytest.skip(reason)
    return done


def _killed_and_resumed(config: Path, home: Path) -> Path:
    killed = _launch(config, home, kill_after=KILL_AFTER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    workspace = json.loads(config.read_text(encoding="utf-8"))["workspace_dir"]
    backups = sorted(p.name for p in (Path(workspace) / "backups").iterdir() if not p.name.startswith("."))
    assert backups[-1] == f"step-{KILL_AFTER:08d}", backups  # killed after that backup, before the next
    backup = Path(workspace) / "backups" / backups[-1]
    state = torch.load(backup / "state.pt", weights_only=True)
    assert len(state["rng_by_process"]) == 2  # every process's RNG states
    if json.loads(config.read_text(encoding="utf-8"))["distributed"]["strategy"] == "FSDP":
        # Each process wrote its shards; nothing was gathered whole.
        files = {p.name for p in backup.iterdir()}
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= files and "trained.safetensors" not in files, files
        assert "optimizer" not in state
    resumed = _launch(config, home, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert f"continuing from the backup of step {KILL_AFTER}" in resumed.stderr + resumed.stdout
    return Path(workspace)


@pytest.mark.parametrize("strategy", ["DDP", "FSDP"])
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(strategy: str, wan21: Path, dataset: Path,
                                                                      tmp_path: Path, user_home: Path) -> None:
    cache = tmp_path / "cache"
    whole = _config(tmp_path, "whole", wan21, dataset, cache, batch_size=1, strategy=strategy)
    done = _launch(whole, user_home)
    assert done.returncode == 0, done.stderr[-6000:]
    reference = load_file(tmp_path / "whole" / "out" / "lora.safetensors")

    crashed = _config(tmp_path, "crashed", wan21, dataset, cache, batch_size=1, strategy=strategy)
    workspace = _killed_and_resumed(crashed, user_home)
    result = load_file(tmp_path / "crashed" / "out" / "lora.safetensors")
    assert result.keys() == reference.keys() and reference
    for key in reference:
        assert torch.equal(result[key], reference[key]), key
    # The metrics continue where the backup was: one record per step, the resumed ones the same losses.
    records = read_metrics(workspace / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(tmp_path / "whole" / "workspace" / "metrics.jsonl")]


def _without_dropout(path: Path) -> Path:
    # LoRA dropout draws from each process's generator per process batch: another process count
    # draws other masks (as random, not the same), so this comparison trains without it.
    config = json.loads(path.read_text(encoding="utf-8"))
    config["lora"]["dropout"] = 0.0
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("strategy", ["DDP", "FSDP"])
def test_a_backup_continues_on_another_process_count_where_the_global_batch_is_the_same(
        strategy: str, wan21: Path, dataset: Path, tmp_path: Path, user_home: Path) -> None:
    # FSDP: the two processes' shards are read into one process's whole weights and optimizer state.
    cache = tmp_path / "cache"
    two = _without_dropout(_config(tmp_path, "two", wan21, dataset, cache, batch_size=1, strategy=strategy))
    done = _launch(two, user_home)
    assert done.returncode == 0, done.stderr[-6000:]
    reference = load_file(tmp_path / "two" / "out" / "lora.safetensors")

    crashed = _without_dropout(_config(tmp_path, "crashed", wan21, dataset, cache, batch_size=1, strategy=strategy))
    killed = _launch(crashed, user_home, kill_after=KILL_AFTER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    # One process with batch_size 1 would train half the global batch: refused, naming batch_size.
    refused = _launch(crashed, user_home, processes=1, resume=True)
    assert refused.returncode == 2, refused.stderr[-4000:]
    assert "batch_size" in refused.stderr and "global batch of 2 images" in refused.stderr, refused.stderr[-2000:]
    # With batch_size 2 it is the same global batch: it continues, to the two-process result up to
    # float summation order and the file's bfloat16 rounding (tests/test_ddp.py's tolerances).
    config = json.loads(crashed.read_text(encoding="utf-8"))
    config["batch_size"] = 2
    crashed.write_text(json.dumps(config), encoding="utf-8")
    resumed = _launch(crashed, user_home, processes=1, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    result = load_file(tmp_path / "crashed" / "out" / "lora.safetensors")
    b1 = torch.cat([reference[k].flatten() for k in sorted(reference)])
    b2 = torch.cat([result[k].flatten() for k in sorted(reference)])
    excess, scale = _rounding_excess(b1, b2), b1.float().abs().max().item()
    print(f"{strategy} resumed on 1 process vs 2: beyond one bf16 step max {excess.max().item():.3g}, "
          f"norm ratio {(excess.norm() / b1.float().norm()).item():.3g}")
    assert excess.max().item() <= MAX_DIFF_TOLERANCE * scale
    assert (excess.norm() / b1.float().norm()).item() <= NORM_TOLERANCE


@pytest.mark.parametrize("strategy", ["DDP", "FSDP"])
def test_a_backup_that_cannot_be_written_stops_every_process(strategy: str, wan21: Path, dataset: Path,
                                                              tmp_path: Path, user_home: Path) -> None:
    # The other process must not go on to wait for the main one at the next step until the process
    # group's timeout: the job ends, with the main process's line and the older backup kept.
    config = _config(tmp_path, "full", wan21, dataset, tmp_path / "cache", batch_size=1, strategy=strategy)
    failed = _launch(config, user_home, kill_after=f"fail:{KILL_AFTER}")
    assert failed.returncode not in (0, -signal.SIGKILL), failed.stderr[-4000:]
    workspace = Path(json.loads(config.read_text(encoding="utf-8"))["workspace_dir"])
    line = f"could not write the backup {workspace / 'backups' / f'step-{KILL_AFTER:08d}'} (set by workspace_dir): the disk is full"
    assert line in failed.stderr, failed.stderr[-4000:]
    assert "the backup of step 2 is kept, continue from it with --resume" in failed.stderr
    # One line, from the main process; what follows it is the launcher's report of a failed child.
    ours = failed.stderr.split("torch/distributed/elastic")[0]
    assert ours.count("error: ") == 1 and "Traceback" not in ours, ours[-4000:]
    assert sorted(p.name for p in (workspace / "backups").iterdir()) == ["step-00000002"]
