"""FINE_TUNE building blocks: the fused backward pass, optimizer checks, the diffusers-folder writer and
the fine-tune config rules, on small torch models and the tiny real Wan models."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core.config import defaults
from core.errors import UserError
from core.export import diffusers_folder
from core.export.diffusers_folder import (
    is_diffusers_folder,
    recover_interrupted,
    save_diffusers_folder,
)
from core.models.wan import WanAdapter
from core.train import optim_checks
from core.train.finetune import finetune_param_groups, finetune_problems, make_trainable
from core.train.fused_backward import FusedBackward
from core.train.optim import build_optimizer, build_scheduler
from core.train.optim_checks import optimizer_problem


# numerics: results depend on float kernels (docs/testing.md)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numerics]


# -- fused backward --------------------------------------------------------------------------------
def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 64x64 weights: 4096 elements, the size from which bitsandbytes keeps its state in 8 bits.
    return torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    ).to(dtype)


def _groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    # Two groups at their own learning rates, as transformer and text encoder would be.
    return [{"params": list(model[:2].parameters()), "lr": 2e-3, "name": "a"},
            {"params": list(model[2:].parameters()), "lr": 5e-4, "name": "b"}]


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 64, generator=g).to(next(model.parameters()).dtype)
    return (model(x) - x.flip(1)).float().pow(2).mean()


def _run_unfused(model: torch.nn.Module, name: str, steps: int) -> list[float]:
    optimizer = build_optimizer(name, _groups(model), 1e-3)
    scheduler = build_scheduler("LINEAR", optimizer, warmup_steps=2, total_steps=8)
    lrs = []
    for step in range(steps):
        _loss(model, step).backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return lrs


def _run_fused(model: torch.nn.Module, fused: FusedBackward, scheduler: Any, steps: range) -> list[float]:
    lrs = []
    for step in steps:
        _loss(model, step).backward()
        assert all(p.grad is None for p in model.parameters()), "a gradient outlived the backward pass"
        lrs.append(fused.param_groups[0]["lr"])
        fused.step()
        scheduler.step()
        fused.zero_grad()
    return lrs


@pytest.mark.parametrize("name", ["ADAMW", "ADAFACTOR", "ADAMW_8BIT"])
def test_fused_backward_takes_the_same_steps_as_the_optimizer(name: str) -> None:
    reference, model = _mlp(), _mlp()
    start = copy.deepcopy(model.state_dict())
    expected_lrs = _run_unfused(reference, name, 5)
    fused = FusedBackward.build(name, _groups(model), 1e-3)
    scheduler = build_scheduler("LINEAR", fused.optimizer, warmup_steps=2, total_steps=8)
    lrs = _run_fused(model, fused, scheduler, range(5))
    assert lrs == pytest.approx(expected_lrs) and lrs[0] == 0.0  # warmup starts at 0, as unfused
    for (key, want), got in zip(reference.state_dict().items(), model.state_dict().values()):
        assert not torch.equal(got, start[key]), f"{key} did not train"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name}: {key} differs")


@pytest.mark.parametrize("name", ["ADAMW", "ADAFACTOR", "ADAMW_8BIT"])
def test_a_resumed_fused_run_continues_identically(name: str) -> None:
    model = _mlp()
    fused = FusedBackward.build(name, _groups(model), 1e-3)
    scheduler = build_scheduler("COSINE", fused.optimizer, warmup_steps=2, total_steps=8)
    _run_fused(model, fused, scheduler, range(3))
    buffer = io.BytesIO()  # a backup: weights, optimizer and scheduler, through torch.save
    torch.save({"model": model.state_dict(), "fused": fused.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    _run_fused(model, fused, scheduler, range(3, 6))

    buffer.seek(0)
    backup = torch.load(buffer, weights_only=True)
    resumed = _mlp(seed=7)  # other initial weights: everything must come from the backup
    resumed.load_state_dict(backup["model"])
    fused2 = FusedBackward.build(name, _groups(resumed), 1e-3)
    scheduler2 = build_scheduler("COSINE", fused2.optimizer, warmup_steps=2, total_steps=8)
    fused2.load_state_dict(backup["fused"])
    scheduler2.load_state_dict(backup["scheduler"])
    _run_fused(resumed, fused2, scheduler2, range(3, 6))
    for (key, want), got in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name}: {key} differs after resuming")


def test_bf16_weights_and_autocast_train_in_place() -> None:
    model = _mlp(dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    fused = FusedBackward.build("ADAMW", [{"params": make_trainable(model)}], 1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, 0)
    loss.backward()
    fused.step()
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_discarding_double_backward_and_remove() -> None:
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    fused = FusedBackward.build("ADAMW", [{"params": list(model.parameters())}], 1e-3)
    with fused.discarding():
        _loss(model, 0).backward()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="twice in one step"):
        _loss(model, 1).backward()  # no fused.step() between: it would step each weight twice
    fused.remove()
    fused.zero_grad()
    _loss(model, 2).backward()
    assert all(p.grad is not None for p in model.parameters())  # plain backward again


def test_fused_backward_state_must_match_the_model() -> None:
    fused = FusedBackward.build("ADAMW", [{"params": list(_mlp().parameters())}], 1e-3)
    other = FusedBackward.build("ADAMW", [{"params": list(_mlp()[:2].parameters())}], 1e-3)
    with pytest.raises(ValueError, match="parameters"):
        other.load_state_dict(fused.state_dict())


# -- ADAMW_8BIT on CPU -----------------------------------------------------------------------------
def test_adamw_8bit_runs_on_cpu_with_8bit_state() -> None:
    # bitsandbytes 0.50 has CPU kernels for its 8-bit optimizers; this pins that finding.
    weight = torch.nn.Parameter(torch.randn(64, 64))
    before = weight.detach().clone()
    optimizer = build_optimizer("ADAMW_8BIT", [{"params": [weight]}], 1e-2)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert not torch.equal(weight.detach(), before)
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert optimizer_problem("ADAMW_8BIT", cuda=False) is None


def test_optimizer_problem_explains_what_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert optimizer_problem("ADAMW", cuda=False) is None and optimizer_problem("ADAFACTOR", cuda=False) is None
    monkeypatch.setattr(optim_checks, "_bnb_cpu_problem", lambda: "bitsandbytes 0.42.0 cannot run AdamW8bit on CPU tensors (...)")
    message = optimizer_problem("ADAMW_8BIT", cuda=False)
    assert message and "CUDA" in message and "ADAMW" in message and "0.42.0" in message
    assert "unknown optimizer" in optimizer_problem("LION", cuda=True)


# -- fine-tune config --------------------------------------------------------------------------------
def _ft_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    config = defaults()
    config.update(training_method="FINE_TUNE", output_path=str(tmp_path / "finetuned"))
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def test_param_groups_follow_the_part_learning_rates(tmp_path: Path) -> None:
    high, low, encoder = _mlp(1), _mlp(2), _mlp(3)
    for module in (high, low, encoder):
        make_trainable(module)
    groups = finetune_param_groups(_ft_config(tmp_path, learning_rate=1e-4), [high])
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("transformer", 1e-4, 8)]
    config = _ft_config(tmp_path, transformer={"learning_rate": 2e-5}, text_encoder={"train": True, "learning_rate": 1e-6})
    groups = finetune_param_groups(config, [high, low], {"text_encoder": encoder})
    assert [(g["name"], g["lr"]) for g in groups] == [("transformer", 2e-5), ("transformer_2", 2e-5), ("text_encoder", 1e-6)]
    assert groups[2]["params"][0] is encoder[0].weight
    with pytest.raises(ValueError, match="text encoder"):
        finetune_param_groups(config, [high])
    frozen = _ft_config(tmp_path, transformer={"learning_rate": 0.0}, text_encoder={"train": True})
    assert [g["name"] for g in finetune_param_groups(frozen, [high], {"text_encoder": encoder})] == ["text_encoder"]


def test_make_trainable_unfreezes_everything() -> None:
    model = _mlp().requires_grad_(False).eval()
    params = make_trainable(model)
    assert len(params) == 8 and all(p.requires_grad for p in params) and model.training


def _keys(problems: list) -> list[str]:
    return [p.key for p in problems]


def test_finetune_problems_name_their_keys(tmp_path: Path) -> None:
    assert finetune_problems(_ft_config(tmp_path), cuda=False) == []
    assert finetune_problems(_ft_config(tmp_path, training_method="LORA", layer_offload_fraction=0.5), cuda=False) == []
    cases = {
        "transformer.weight_dtype": _ft_config(tmp_path, transformer={"weight_dtype": "INT_8"}),
        "layer_offload_fraction": _ft_config(tmp_path, layer_offload_fraction=0.3),
        "output_path": _ft_config(tmp_path, output_path=str(tmp_path / "model.safetensors")),
    }
    for key, config in cases.items():
        problems = finetune_problems(config, cuda=True)
        assert _keys(problems) == [key], (key, [str(p) for p in problems])
    nf4 = finetune_problems(_ft_config(tmp_path, text_encoder={"train": True, "weight_dtype": "NFLOAT_4"}), cuda=True)
    assert _keys(nf4) == ["text_encoder.weight_dtype"] and "quantized" in str(nf4[0])
    assert _keys(finetune_problems(_ft_config(tmp_path, transformer={"weight_dtype": "FLOAT_16"}), cuda=True)) == ["transformer.weight_dtype"]
    # fused backward: one message per conflicting setting, each naming fused_backward and the other key
    fused = _ft_config(tmp_path, fused_backward=True, gradient_accumulation_steps=4, max_grad_norm=1.0, optimizer="PRODIGY", train_dtype="FLOAT_16")
    problems = finetune_problems(fused, cuda=True, world_size=2)
    assert _keys(problems) == ["fused_backward"] * 5
    also = {k for p in problems for k in p.keys}
    assert {"gradient_accumulation_steps", "max_grad_norm", "optimizer", "train_dtype"} <= also
    assert any("one GPU" in str(p) for p in problems)
    ok = _ft_config(tmp_path, fused_backward=True, max_grad_norm=0.0, optimizer="ADAFACTOR")
    assert finetune_problems(ok, cuda=False) == []


# -- the diffusers folder ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan21(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan21")


@pytest.fixture(scope="module")
def a14b(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan22_a14b")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_briefly(transformer: torch.nn.Module, fused: bool = True, steps: int = 2) -> None:
    """A real fine-tune of the tiny Wan transformer (fused: the weights step inside backward), with
    diffusers' non-reentrant gradient checkpointing recomputing blocks while other weights already moved."""
    transformer.enable_gradient_checkpointing()
    groups = [{"params": make_trainable(transformer)}]
    optimizer = FusedBackward.build("ADAFACTOR", groups, 1e-2) if fused else build_optimizer("ADAFACTOR", groups, 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        latents = torch.randn(1, 16, 1, 4, 4, generator=g).to(transformer.dtype)
        text = torch.randn(1, 8, 32, generator=g).to(transformer.dtype)
        out = transformer(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    if fused:
        optimizer.remove()
    transformer.eval()


def _no_leftovers(out: Path) -> None:
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_a_fine_tuned_wan21_saves_a_folder_the_pipeline_loads(wan21: Path, tmp_path: Path) -> None:
    from diffusers import WanPipeline

    before = _digest(wan21)
    adapter = WanAdapter(wan21)
    transformer = adapter.load_transformer("transformer", "cpu", torch.bfloat16)  # BFLOAT_16 weights train in place
    start = {k: v.clone() for k, v in transformer.state_dict().items()}
    _train_briefly(transformer)
    unfused = adapter.load_transformer("transformer", "cpu", torch.bfloat16)
    _train_briefly(unfused, fused=False)
    for (key, want), got in zip(unfused.state_dict().items(), transformer.state_dict().values()):
        torch.testing.assert_close(got, want, msg=f"fused and unfused Wan fine-tunes differ at {key}")
    encoder = adapter.load_text_encoder("cpu", torch.float32)
    with torch.no_grad():
        encoder.shared.weight.add_(0.5)  # a "trained" text encoder
    out = save_diffusers_folder(tmp_path / "out" / "finetuned", wan21, {"transformer": transformer, "text_encoder": encoder},
                                extra_files={"video_trainer.json": json.dumps({"steps": 2})})
    assert is_diffusers_folder(out) and not is_diffusers_folder(tmp_path) and _digest(wan21) == before
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert json.loads((out / "video_trainer.json").read_text())["steps"] == 2
    saved = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # saved in the dtype it trained in
    # untouched parts are the base's bytes (hard links where the filesystem has them)
    vae_out, vae_base = out / "vae" / "diffusion_pytorch_model.safetensors", wan21 / "vae" / "diffusion_pytorch_model.safetensors"
    assert vae_out.read_bytes() == vae_base.read_bytes()
    if vae_out.stat().st_dev == vae_base.stat().st_dev:
        assert vae_out.samefile(vae_base)  # one filesystem: a hard link, no second copy on disk
    pipe = WanPipeline.from_pretrained(out)
    loaded = pipe.transformer.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in transformer.state_dict().items())
    for key, value in transformer.state_dict().items():
        assert torch.equal(loaded[key].to(value.dtype), value), key
    assert torch.equal(pipe.text_encoder.shared.weight, encoder.shared.weight)
    _no_leftovers(out)


def test_both_a14b_experts_save_and_load(a14b: Path, tmp_path: Path) -> None:
    from diffusers import WanPipeline

    adapter = WanAdapter(a14b)
    experts = {name: adapter.load_transformer(name, "cpu", torch.float32) for name in adapter.transformer_names()}
    for i, expert in enumerate(experts.values()):
        with torch.no_grad():
            expert.proj_out.weight.add_(i + 1.0)
    out = save_diffusers_folder(tmp_path / "a14b-ft", a14b, experts)
    pipe = WanPipeline.from_pretrained(out)
    assert torch.equal(pipe.transformer.proj_out.weight, experts["transformer"].proj_out.weight)
    assert torch.equal(pipe.transformer_2.proj_out.weight, experts["transformer_2"].proj_out.weight)
    assert json.loads((out / "model_index.json").read_text()) == json.loads((a14b / "model_index.json").read_text())


class _Failing(torch.nn.Module):
    def save_pretrained(self, folder: Path, **kwargs: Any) -> None:
        Path(folder).mkdir()
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")


def test_an_existing_output_is_replaced_and_never_lost(wan21: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = WanAdapter(wan21)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    out = save_diffusers_folder(tmp_path / "ft", wan21, {"transformer": transformer})
    first = _digest(out)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers_folder(out, wan21, {"transformer": _Failing()})
    assert _digest(out) == first
    _no_leftovers(out)

    # the second rename fails: the previous result goes back under its name
    real_replace = os.replace
    def failing_replace(src: Any, dst: Any) -> None:
        if ".tmp-" in str(src):
            raise OSError("rename refused")
        real_replace(src, dst)
    monkeypatch.setattr(diffusers_folder.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename refused"):
        save_diffusers_folder(out, wan21, {"transformer": transformer})
    monkeypatch.undo()
    assert _digest(out) == first
    _no_leftovers(out)

    # a crash between the two renames: the old result waits under .NAME.old-*, the next save restores it
    os.replace(out, out.parent / f".{out.name}.old-dead")
    (out.parent / f".{out.name}.tmp-dead").mkdir()
    assert recover_interrupted(out) and _digest(out) == first
    with torch.no_grad():
        transformer.proj_out.weight.add_(1.0)
    save_diffusers_folder(out, wan21, {"transformer": transformer})
    assert _digest(out) != first
    _no_leftovers(out)
    with pytest.raises(UserError, match="overlaps"):
        save_diffusers_folder(wan21 / "inside", wan21, {})


def test_a_hub_snapshot_base_is_copied_not_linked(wan21: Path, tmp_path: Path) -> None:
    from diffusers import WanPipeline

    # the hub cache's layout: snapshots/<rev>/<path> are symlinks to blobs/<hash>
    hub = tmp_path / "hub" / "models--tiny--wan"
    blobs, snapshot = hub / "blobs", hub / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    for file in (p for p in wan21.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(wan21)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    transformer = WanAdapter(snapshot).load_transformer("transformer", "cpu", torch.float32)
    out = save_diffusers_folder(tmp_path / "from-hub", snapshot, {"transformer": transformer})
    assert not any(p.is_symlink() for p in out.rglob("*"))
    shutil.rmtree(tmp_path / "hub")  # the user clears the hub cache: the output still loads
    pipe = WanPipeline.from_pretrained(out)
    assert torch.equal(pipe.transformer.proj_out.weight, transformer.proj_out.weight)
