"""distributed.strategy FSDP: two CPU processes (gloo) shard the tiny Wan transformer and train what one
process with the same global batch trains, for LORA (on a sharded frozen base) and FINE_TUNE.

Each two-process run goes through `accelerate launch ... main.py train --config`, as a user would
start it, and through accelerate's FSDP2 code (core/train/fsdp.py says how a CPU job gets there).
run_info.json records what each process held: each about half of the parameters. The saved files
are gathered on the main process and load in diffusers.

Tolerances follow tests/test_ddp.py's reasoning: one process averages the loss over its batch of
two, FSDP's reduce-scatter sums the two one-sample gradients in another order; the rest is the same
float32 arithmetic. What is left is float32 summation order, and for the LoRA its rounding to bfloat16.
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

from core.config.settings import defaults
from core.errors import ConfigError
from core.models.tiny import build_tiny_model
from core.train.fsdp import fsdp_refusals
from core.train.metrics_reader import read_metrics

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

STEPS = 4


# -- what cannot combine with FSDP, said by name ---------------------------------------------------


def _fsdp(**changes: object) -> dict:
    config = defaults()
    config["distributed"]["strategy"] = "FSDP"
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    return config


@pytest.mark.parametrize("changes, key", [
    ({"layer_offload_fraction": 0.5}, "layer_offload_fraction"),
    ({"training_method": "FINE_TUNE", "fused_backward": True}, "fused_backward"),
    ({"transformer__weight_dtype": "NFLOAT_4"}, "transformer.weight_dtype"),
    ({"transformer__weight_dtype": "FLOAT_8"}, "transformer.weight_dtype"),
    ({"training_method": "EMBEDDING"}, "training_method"),
    ({"training_method": "FINE_TUNE", "text_encoder__train": True}, "text_encoder.train"),
    ({"ema__enabled": True}, "ema.enabled"),
    ({"validation__every_n_steps": 10}, "validation.every_n_steps"),
    ({"sampling__prompts": ["a cat"]}, "sampling.prompts"),
])  # fmt: skip
def test_what_cannot_shard_is_refused_by_name(changes: dict, key: str) -> None:
    problems = fsdp_refusals(_fsdp(**changes))
    assert [p.keys for p in problems] == [("distributed.strategy", key)]
    assert key in str(problems[0]) and "distributed.strategy DDP" in str(problems[0])
    ddp = _fsdp(**changes)
    ddp["distributed"]["strategy"] = "DDP"
    assert fsdp_refusals(ddp) == []


def test_two_experts_at_once_are_refused() -> None:
    (problem,) = fsdp_refusals(_fsdp(), denoiser_count=2)
    assert isinstance(problem, ConfigError) and problem.keys == ("distributed.strategy", "experts.train")
    assert fsdp_refusals(_fsdp(), denoiser_count=1) == []


# -- two processes against one -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan21(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("wan21", tmp_path_factory.mktemp("fsdp-model") / "wan21")


def _config(tmp_path: Path, name: str, model: Path, data: Path, batch_size: int, **changes: object) -> Path:
    run = tmp_path / name
    path = _write_config(tmp_path / f"{name}.json", model, data, run, run / "cache", batch_size=batch_size)
    config = json.loads(path.read_text(encoding="utf-8"))
    config["max_steps"] = STEPS
    config.update(changes)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _launch(config: Path, home: Path, processes: int = 2) -> None:
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", str(_free_port()), "main.py", "train", "--config", str(config),
    ]  # fmt: skip
    done = _run(launch, home, timeout=240)
    if done.returncode != 0:
        reason = _gloo_starts()
        if reason:
            pytest.skip(reason)
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.count("saved ") == 1  # gathered, and saved by the main process only


def _single(config: Path, home: Path) -> None:
    done = _run([sys.executable, "main.py", "train", "--config", str(config)], home, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


def _check_sharded(workspace: Path) -> None:
    info = json.loads((workspace / "run_info.json").read_text(encoding="utf-8"))
    assert info["world_size"] == 2 and info["global_batch_size"] == 2
    sharded = info["distributed"]
    assert sharded["wrapped"] == ["WanTransformerBlock"]
    whole, held = sharded["parameters"], sharded["parameters_per_process"]
    # Each process holds its half of every tensor (dim 0 split in two, the odd row in the first).
    assert len(held) == 2 and all(0.45 * whole <= h <= 0.55 * whole for h in held), (held, whole)
    assert sum(held) == whole, (held, whole)


def _check_losses(one: Path, two: Path) -> None:
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, STEPS + 1))
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOLERANCE * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert a["lr"] == b["lr"], (a["step"], a["lr"], b["lr"])


def test_fsdp_lora_trains_what_one_process_trains(wan21: Path, dataset: Path, tmp_path: Path, user_home: Path) -> None:
    one = _config(tmp_path, "one", wan21, dataset, batch_size=2)
    two = _config(tmp_path, "two", wan21, dataset, batch_size=1, distributed={"strategy": "FSDP", "sharding": "FULL_SHARD"})
    _single(one, user_home)
    _launch(two, user_home)
    _check_sharded(tmp_path / "two" / "workspace")
    _check_losses(tmp_path / "one" / "workspace", tmp_path / "two" / "workspace")

    l1 = load_file(tmp_path / "one" / "out" / "lora.safetensors")
    l2 = load_file(tmp_path / "two" / "out" / "lora.safetensors")
    assert l1.keys() == l2.keys() and l1
    assert all(l1[k].dtype == l2[k].dtype == torch.bfloat16 for k in l1)
    b1 = torch.cat([l1[k].flatten() for k in sorted(l1)])
    b2 = torch.cat([l2[k].flatten() for k in sorted(l1)])
    excess, scale = _rounding_excess(b1, b2), b1.float().abs().max().item()
    print(f"FSDP LoRA vs one process: beyond one bf16 step max {excess.max().item():.3g} (largest {scale:.3g}), "
          f"norm ratio {(excess.norm() / b1.float().norm()).item():.3g}")
    assert excess.max().item() <= MAX_DIFF_TOLERANCE * scale
    assert (excess.norm() / b1.float().norm()).item() <= NORM_TOLERANCE
    moved = max(l2[k].abs().max().item() for k in l2 if "lora_B" in k)
    # It trained: the up-projections start at zero; after 4 steps at lr 1e-3 (2 of warmup) they moved
    # by about 2e-3, far past what the two runs differ by beyond rounding.
    assert moved > 1e-3 and moved > 100 * excess.max().item(), moved

    # The gathered file loads in diffusers and changes the model as the one-process file does.
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan21)
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 512, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    with torch.no_grad():
        before = pipe.transformer(x, t, text, return_dict=False)[0]
        outputs = []
        for name in ("one", "two"):
            pipe.load_lora_weights(str(tmp_path / name / "out" / "lora.safetensors"), adapter_name=name)
            pipe.set_adapters([name])
            outputs.append(pipe.transformer(x, t, text, return_dict=False)[0])
    change = (outputs[0] - before).abs().max().item()
    gap = (outputs[1] - outputs[0]).abs().max().item()
    print(f"LoRA outputs: change {change:.3g}, one vs two processes {gap:.3g}")
    assert change > 1e-4 and gap <= 1e-2 * change


def test_fsdp_fine_tune_trains_what_one_process_trains(wan21: Path, dataset: Path, tmp_path: Path, user_home: Path) -> None:
    fine_tune = {"training_method": "FINE_TUNE", "learning_rate": 1e-4}
    one = _config(tmp_path, "one", wan21, dataset, batch_size=2, **fine_tune)
    two = _config(tmp_path, "two", wan21, dataset, batch_size=1, distributed={"strategy": "FSDP", "sharding": "SHARD_GRAD_OP"},
                  **fine_tune)
    for path in (one, two):  # FINE_TUNE saves a folder
        config = json.loads(path.read_text(encoding="utf-8"))
        config["output_path"] = str(Path(config["output_path"]).with_suffix(""))
        path.write_text(json.dumps(config), encoding="utf-8")
    _single(one, user_home)
    _launch(two, user_home)
    _check_sharded(tmp_path / "two" / "workspace")
    _check_losses(tmp_path / "one" / "workspace", tmp_path / "two" / "workspace")

    from diffusers import WanPipeline

    base = WanPipeline.from_pretrained(wan21).transformer.state_dict()
    w1 = WanPipeline.from_pretrained(tmp_path / "one" / "out" / "lora").transformer.state_dict()
    w2 = WanPipeline.from_pretrained(tmp_path / "two" / "out" / "lora").transformer.state_dict()
    assert w1.keys() == w2.keys() == base.keys()
    assert all(w1[k].dtype == w2[k].dtype == base[k].dtype for k in w1)  # saved as one process saves
    update = torch.cat([(w1[k] - base[k]).flatten() for k in sorted(w1)])
    diff = torch.cat([(w1[k] - w2[k]).flatten() for k in sorted(w1)])
    print(f"FSDP FINE_TUNE vs one process: max diff {diff.abs().max().item():.3g}, update max {update.abs().max().item():.3g}, "
          f"diff norm / update norm {(diff.norm() / update.norm()).item():.3g}")
    assert update.abs().max().item() > 0
    assert (diff.norm() / update.norm()).item() <= FINE_TUNE_NORM_TOLERANCE
    assert diff.abs().max().item() <= FINE_TUNE_MAX_TOLERANCE * update.abs().max().item()


# FINE_TUNE saves float32 weights (the demo preset's weight_dtype), so no rounding hides anything: the
# two runs differ by float32 summation order, which Adam's normalisation magnifies where gradients are
# tiny. Measured on 2 CPU cores (torch 2.13): after 4 steps at lr 1e-4, differences at most 1.2e-7
# (6e-4 of the largest update, 2.0e-4), their norm 1.2e-5 of the update's norm. A planted fault (a
# process drawing the other's noise or sample) changes every step's gradient at full size: differences
# of the order of the update itself. The tolerances sit about 17x and 80x above what was measured.
FINE_TUNE_NORM_TOLERANCE = 1e-3  # norm of the differences / norm of the update (measured 1.2e-5)
FINE_TUNE_MAX_TOLERANCE = 1e-2  # of the largest update (measured 6e-4)
