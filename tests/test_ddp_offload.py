"""DDP with layer offloading: two CPU processes, each streaming half of the tiny Wan transformer's
blocks from its CPU masters (core/memory/offload.py; without CUDA the same code runs with the "GPU
copy" a clone), train what one process with the same offloading and the global batch trains.

DDP never sees the offloaded tensors (they are frozen, and ignore_frozen_for_ddp keeps every frozen
tensor out of its broadcast), so only the LoRA's gradients are averaged, as without offloading. The
tolerances are tests/test_ddp.py's: the same float32 summation-order argument, the same bfloat16
rounding of the LoRA file; offloading moves weights and changes no arithmetic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import (  # noqa: F401 - dataset is a fixture used by name
    LOSS_TOLERANCE,
    MAX_DIFF_TOLERANCE,
    NORM_TOLERANCE,
    _free_port,
    _gloo_starts,
    _rounding_excess,
    _run,
    _write_config,
    dataset,
)

from core.models.tiny import build_tiny_model
from core.train.metrics_reader import read_metrics

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

STEPS = 4


def _config(tmp_path: Path, name: str, model: Path, data: Path, batch_size: int) -> Path:
    run = tmp_path / name
    path = _write_config(tmp_path / f"{name}.json", model, data, run, run / "cache", batch_size=batch_size)
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(max_steps=STEPS, layer_offload_fraction=0.5, gradient_checkpointing="ON")
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def test_ddp_with_layer_offloading_trains_what_one_process_trains(dataset: Path, tmp_path: Path, user_home: Path) -> None:
    model = build_tiny_model("wan21", tmp_path / "wan21")
    one, two = _config(tmp_path, "one", model, dataset, 2), _config(tmp_path, "two", model, dataset, 1)
    single = _run([sys.executable, "main.py", "train", "--config", str(one)], user_home, timeout=240)
    assert single.returncode == 0, single.stderr[-4000:]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", str(_free_port()), "main.py", "train", "--config", str(two),
    ]  # fmt: skip
    double = _run(launch, user_home, timeout=240)
    if double.returncode != 0:
        reason = _gloo_starts()
        if reason:
            pytest.skip(reason)
    assert double.returncode == 0, double.stderr[-6000:]

    m1, m2 = read_metrics(tmp_path / "one" / "workspace" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "workspace" / "metrics.jsonl")
    assert [r["step"] for r in m2] == list(range(1, STEPS + 1))
    # Both offloaded: the offloaded block's frozen weights were copied in from its CPU master (the
    # tiny model's one offloaded block then stays in one of the slots), the same bytes as one process.
    moved = [r["offload_bytes_per_step"] for r in m2]
    assert sum(moved) > 0 and moved == [r["offload_bytes_per_step"] for r in m1], moved
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOLERANCE * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    l1, l2 = load_file(tmp_path / "one" / "out" / "lora.safetensors"), load_file(tmp_path / "two" / "out" / "lora.safetensors")
    assert l1.keys() == l2.keys() and l1
    b1 = torch.cat([l1[k].flatten() for k in sorted(l1)])
    b2 = torch.cat([l2[k].flatten() for k in sorted(l1)])
    excess, scale = _rounding_excess(b1, b2), b1.float().abs().max().item()
    print(f"DDP + offloading vs one process: beyond one bf16 step max {excess.max().item():.3g}, "
          f"norm ratio {(excess.norm() / b1.float().norm()).item():.3g}")
    assert excess.max().item() <= MAX_DIFF_TOLERANCE * scale
    assert (excess.norm() / b1.float().norm()).item() <= NORM_TOLERANCE
    assert max(l2[k].abs().max().item() for k in l2 if "lora_B" in k) > 1e-3  # it trained
