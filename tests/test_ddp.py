"""Several processes (DDP through `accelerate launch`) train what one process with the same global
batch trains: two CPU processes over gloo with batch_size 1 against one process with batch_size 2.

Both runs go through `main.py train --config`, as a user would start them. The two LoRAs and the
per-step losses must agree up to float summation order (DDP averages the two per-process gradients
where the single process averages over its batch of two) and the bfloat16 rounding of the saved LoRA,
and only the main process writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from media_factory import make_clip
from safetensors.torch import load_file

from core.data.buckets import (
    BucketBatchSampler,
    ShardedBatchSampler,
    shard_batch,
    shard_positions,
    total_batches,
)
from core.models.tiny import build_tiny_model
from core.train.metrics_reader import read_metrics
from core.train.draws import sample_noise

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "presets" / "#demo tiny wan LoRA.json"
STEPS = 6
# The runs differ only in float32 summation order: one process averages the loss over its batch of
# two, DDP's all-reduce sums the two one-sample gradients in another order. The float32 weights end
# a few float32 ulps apart, and the LoRA file holds them rounded to bfloat16 (8 significant bits):
# two float32 values a hair apart round to the same bfloat16 value or to neighbours one bfloat16
# step apart, whichever side of a rounding boundary they fall on. Where they fall depends on the
# CPU's kernels (an AVX-512 machine sums in other orders than an AVX2 one), so one bfloat16 step of
# difference is expected at any magnitude, also at the largest weight (0.205, whose step is 2**-10 =
# 0.000977), and is no fault. The weight checks therefore allow each value one bfloat16 step at its
# magnitude (_rounding_excess) and measure the rest against the tolerances below; what is left is at
# most the float32 difference, which the rounding cannot hide.
# Measured on 2 CPU cores (torch 2.13, AVX2 and default kernels): losses at most 2e-7 relative,
# learning rates equal; LoRA weights: all but 8 of 8448 bf16 values equal, those 8 one bf16 step
# apart (with AVX2 0.000977 at the largest weight: the failure reported from an AVX-512 machine),
# beyond that step at most 4.8e-7 (2.3e-6 of the largest weight), norm ratio 6.7e-8. With a
# constant learning rate (measured before, on another CPU) 13 values differed, by up to 3 bf16 steps
# (4.6e-5) on small lora_B values whose tiny gradients Adam's normalisation magnifies: 2 steps beyond
# one, 1.5e-4 of the largest weight.
# A real fault changes every step's gradient at full size. Measured with faults planted on purpose:
# process 1 drawing process 0's noise: largest difference 4.8e-3 (2.4e-2 of the largest weight,
# 5 bf16 steps there), norm ratio 1.2e-2, 6173 values differ, step-1 losses 3% apart; both processes
# taking the same sample: 3.7e-3 (1.8e-2) and 7.3e-3; the LR schedule stepped once per process: the
# learning rates differ from step 1. The tolerances sit between, a factor 18 or more from either side.
# Losses are float32 means of a forward through weights a few float32 ulps apart: 128 float32 ulps
# (1.5e-5) relative is 75x the measured 2e-7 and 2000x below a fault's 3%.
LOSS_TOLERANCE = 128 * torch.finfo(torch.float32).eps  # relative, per step
MAX_DIFF_TOLERANCE = 1e-3  # of the largest weight, beyond one bf16 step per value (measured 2.3e-6)
NORM_TOLERANCE = 1e-4  # norm of the differences beyond one bf16 step / norm of the weights (measured 6.7e-8)


def _rounding_excess(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| less one step of a's dtype at the larger magnitude, as float32 (0 where no more).

    Rounding x1 and x2 to the nearest value moves each by at most half a step, a step at the larger
    rounded magnitude being at least either one's (the step above a value is the larger one at a
    power of two), so |round(x1) - round(x2)| <= |x1 - x2| + step: the excess is a lower bound of
    the difference of the unrounded float32 weights.
    """
    larger = torch.maximum(a.abs(), b.abs())
    step = (torch.nextafter(larger, torch.full_like(larger, float("inf"))) - larger).float()
    return ((a.float() - b.float()).abs() - step).clamp_min(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the pieces, in one process ------------------------------------------------------------------


def _records() -> list:
    # 5 images of one bucket, 3 videos of another: partial batches in both.
    images = [(f"i{k}", (1, 64, 64), 1, False) for k in range(5)]
    videos = [(f"v{k}", (9, 64, 96), 1, True) for k in range(3)]
    return images + videos


def test_the_shares_of_a_global_batch_are_the_batch() -> None:
    single = list(BucketBatchSampler(_records(), 4, 0.5, seed=7, steps=12))
    global_ = list(BucketBatchSampler(_records(), 2, 0.5, seed=7, steps=12, world_size=2))
    shares = [list(ShardedBatchSampler(BucketBatchSampler(_records(), 2, 0.5, seed=7, steps=12, world_size=2), r, 2)) for r in (0, 1)]
    # batch_size per process: 2 processes x 2 images = the 4 of one process with batch_size 4; videos
    # max(1, round(2 x 0.5)) = 1 per process, 2 together = round(4 x 0.5) of the single run.
    assert [b.samples for b in global_] == [b.samples for b in single]
    for batch, first, second in zip(global_, *shares):
        assert first.step == second.step == batch.step and first.bucket == second.bucket == batch.bucket
        assert len(first.samples) == len(second.samples)
        padded = (batch.samples * 2)[: len(first.samples) * 2]
        assert [padded[p] for p in shard_positions(len(first.samples), 0, 2)] == list(first.samples)
        assert [padded[p] for p in shard_positions(len(second.samples), 1, 2)] == list(second.samples)
        if len(batch.samples) % 2 == 0:  # a full or even batch is split exactly, nothing repeated
            assert sorted(first.samples + second.samples) == sorted(batch.samples)
    # 5 images in 4s and 3 videos in 2s leave short batches of 1: padded to 2 by repeating the sample.
    short = next(b for b in global_ if len(b.samples) == 1)
    assert shard_batch(short, 0, 2).samples == shard_batch(short, 1, 2).samples == short.samples
    assert total_batches({"stop_after": "EPOCHS", "epochs": 1, "video_config": {"video_batch_size_multiplier": 0.5},
                          "batch_size": 2}, _records(), world_size=2) == 2 + 2  # fmt: skip
    assert shard_batch(short, 0, 1) is short
    with pytest.raises(ValueError):
        shard_batch(short, 2, 2)


def test_a_sample_gets_its_noise_whichever_process_holds_it() -> None:
    objective = {"timestep_distribution": "LOGIT_NORMAL"}
    sigmas, noise = sample_noise((4, 2, 3, 4, 4), [0, 1, 2, 3], 5, 11, objective)
    even_sigmas, even_noise = sample_noise((2, 2, 3, 4, 4), shard_positions(2, 0, 2), 5, 11, objective)
    odd_sigmas, odd_noise = sample_noise((2, 2, 3, 4, 4), shard_positions(2, 1, 2), 5, 11, objective)
    assert torch.equal(sigmas[0::2], even_sigmas) and torch.equal(noise[0::2], even_noise)
    assert torch.equal(sigmas[1::2], odd_sigmas) and torch.equal(noise[1::2], odd_noise)
    other_step, _ = sample_noise((4, 2, 3, 4, 4), [0, 1, 2, 3], 5, 12, objective)
    assert not torch.equal(other_step, sigmas) and len(set(sigmas.tolist())) == 4


def test_one_bfloat16_step_is_rounding_and_more_is_not() -> None:
    # The AVX-512 case: the largest weight (0.2) one bf16 step apart, 0.000977, 4.8x MAX_DIFF_TOLERANCE.
    a = torch.tensor([0.2, 0.01, -0.03, 0.0, 0.2], dtype=torch.bfloat16)
    up = torch.nextafter(a, torch.full_like(a, float("inf")))
    assert _rounding_excess(a, up).tolist() == [0.0] * 5
    assert _rounding_excess(up, a).tolist() == [0.0] * 5
    # Just below a power of two the step above is twice the one below: still one rounding.
    below = torch.tensor([0.25], dtype=torch.bfloat16)
    assert _rounding_excess(torch.nextafter(below, torch.zeros(1, dtype=torch.bfloat16)), below).item() == 0.0
    # Five steps apart (the planted faults' difference at 0.2): four steps are left, above the tolerance.
    five = a.float() + 5 * (up.float() - a.float())
    excess = _rounding_excess(a, five.to(torch.bfloat16))
    torch.testing.assert_close(excess, 4 * (up.float() - a.float()), rtol=0, atol=0)
    assert excess[0] > MAX_DIFF_TOLERANCE * 0.2


# -- two processes against one, end to end ----------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Four clips of one bucket (square, resized to 64x64) that differ in content and caption, so a
    # process that took the wrong samples would train on something else.
    folder = tmp_path_factory.mktemp("four-clips")
    for k, size in enumerate((64, 80, 96, 112)):
        make_clip(folder / f"clip{k}.mp4", width=size, height=size, fps=16, seconds=1.0, scene_cuts=(0.2 * (k + 1),))
        (folder / f"clip{k}.txt").write_text(f"clip number {k}: a square on a changing background", encoding="utf-8")
    return folder


def _write_config(path: Path, model: Path, data: Path, run: Path, cache: Path, batch_size: int) -> Path:
    config = json.loads(PRESET.read_text(encoding="utf-8"))
    config.update(
        base_model=str(model),
        datasets=[{"path": str(data), "repeats": 1}],
        workspace_dir=str(run / "workspace"),
        cache_dir=str(cache),
        output_path=str(run / "out" / "lora.safetensors"),
        batch_size=batch_size,
        max_steps=STEPS,
        learning_rate=1e-3,
        warmup_steps=2,
        lr_scheduler="COSINE",
        dataloader_threads=0,
        gradient_checkpointing="OFF",
        train_dtype="FLOAT_32",
        sampling={"every_n_steps": 0},
        backup={"every_n_steps": 0},
        # Videos batch at the full batch_size: with the default 0.5 a process with batch_size 1 still
        # takes 1 video (the floor), so 2 x 1 would not be the 1 x 2 -> 1 video of the single run.
        video_config={**config.get("video_config", {}), "video_batch_size_multiplier": 1.0},
    )
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _run(args: list[str], home: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VIDEO_TRAINER_HOME=str(home),
        CUDA_VISIBLE_DEVICES="",  # CPU in both runs, also on a machine with a GPU: gloo, same numerics
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",  # one thread per process in both runs: 2 processes share 2 cores
    )
    return subprocess.run(args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


GLOO_PROBE = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
t = torch.ones(1)
dist.all_reduce(t)
dist.destroy_process_group()
"""


def _gloo_starts() -> str | None:
    """None if a gloo process group starts here, else why not (the test is skipped then)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    try:
        probe = subprocess.run([sys.executable, "-c", GLOO_PROBE, str(_free_port())], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"a one-process gloo group did not start: {e}"
    if probe.returncode != 0:
        return f"a one-process gloo group does not start in this sandbox: {probe.stderr.strip()[-500:]}"
    return None


def test_two_processes_train_what_one_process_trains(dataset: Path, tmp_path: Path, user_home: Path) -> None:
    model = build_tiny_model("wan21", tmp_path / "wan21")
    one, two = tmp_path / "one", tmp_path / "two"
    # Separate caches: in the 2-process run the main process fills its cache while the other waits.
    cfg1 = _write_config(tmp_path / "cfg1.json", model, dataset, one, one / "cache", batch_size=2)
    cfg2 = _write_config(tmp_path / "cfg2.json", model, dataset, two, two / "cache", batch_size=1)

    started = time.perf_counter()
    single = _run([sys.executable, "main.py", "train", "--config", str(cfg1)], user_home, timeout=120)
    assert single.returncode == 0, single.stderr[-4000:]
    middle = time.perf_counter()
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", str(_free_port()), "main.py", "train", "--config", str(cfg2),
    ]  # fmt: skip
    double = _run(launch, user_home, timeout=120)
    if double.returncode != 0:
        reason = _gloo_starts()  # only asked when the launch failed: the probe costs seconds
        if reason:
            pytest.skip(reason)
    assert double.returncode == 0, double.stderr[-6000:]
    print(f"1 process: {middle - started:.1f} s, 2 processes: {time.perf_counter() - middle:.1f} s")

    # The 2-process run was one: both processes trained, and only the main one wrote.
    info = json.loads((two / "workspace" / "run_info.json").read_text(encoding="utf-8"))
    assert info["world_size"] == 2 and info["global_batch_size"] == 2
    single_info = json.loads((one / "workspace" / "run_info.json").read_text(encoding="utf-8"))
    assert single_info["world_size"] == 1 and single_info["global_batch_size"] == 2
    assert double.stdout.count("finished: 6 of 6 steps") == 1  # the main process speaks for the run
    assert double.stdout.count("saved ") == 1  # but only the main process saved
    assert double.stderr.count("latents: 4 computed, 0 already cached; captions: 4 computed") == 1  # and cached

    m1 = read_metrics(one / "workspace" / "metrics.jsonl")
    m2 = read_metrics(two / "workspace" / "metrics.jsonl")
    assert [r["step"] for r in m1] == list(range(1, STEPS + 1))
    assert [r["step"] for r in m2] == list(range(1, STEPS + 1))  # written once: no rank-1 lines
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOLERANCE * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["timestep"] - b["timestep"]) <= 1e-3, (a["step"], a["timestep"], b["timestep"])
        assert a["lr"] == b["lr"], (a["step"], a["lr"], b["lr"])  # the schedule steps once per step, not per process

    l1 = load_file(one / "out" / "lora.safetensors")
    l2 = load_file(two / "out" / "lora.safetensors")
    assert l1.keys() == l2.keys() and l1
    assert all(l1[k].dtype == l2[k].dtype == torch.bfloat16 for k in l1)  # the step _rounding_excess allows
    b1 = torch.cat([l1[k].flatten() for k in sorted(l1)])
    b2 = torch.cat([l2[k].flatten() for k in sorted(l1)])
    w1, w2 = b1.float(), b2.float()
    diff, excess = (w1 - w2).abs(), _rounding_excess(b1, b2)
    worst, scale = excess.max().item(), w1.abs().max().item()
    ratio = (excess.norm() / w1.norm()).item()
    print(f"LoRA 1 vs 2 processes: max diff {diff.max().item():.3g} (largest weight {scale:.3g}), "
          f"{int((diff > 0).sum())} of {diff.numel()} values differ; beyond one bf16 step: max {worst:.3g}, "
          f"norm / norm {ratio:.3g}")
    assert worst <= MAX_DIFF_TOLERANCE * scale, (worst, scale)
    assert ratio <= NORM_TOLERANCE, ratio
    # And it trained: the up-projections start at zero and moved far past the tolerance.
    moved = max(l1[k].abs().max().item() for k in l1 if "lora_B" in k or "lora_up" in k)
    assert moved > 10 * MAX_DIFF_TOLERANCE * scale, moved
