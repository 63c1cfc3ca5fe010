"""LoRA files: the DIFFUSERS and COMFY formats load back into diffusers with the trained effect.

A tiny Wan 2.1 transformer gets a peft LoRA (rank 4, alpha 8) with random lora_B weights, so the
LoRA changes the output; each saved file is loaded into a fresh pipeline from the same folder and
the transformer's output compared with the LoRA-carrying one's on a fixed input.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open
from safetensors.torch import load_file

from numerics import forward_tolerance

from core.errors import UserError
from core.export.comfy_wan import diffusers_to_comfy
from core.export.lora import expert_output_paths, lora_state_dict, save_lora

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

RANK, ALPHA = 4, 8
BLOCK_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                 "ffn.net.0.proj", "ffn.net.2"]
# Outside the blocks: COMFY bakes alpha/rank into lora_B there (diffusers reads no alpha for them).
GLOBAL_TARGETS = ["proj_out", "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1"]

COMFY_KEY_PATTERNS = [
    re.compile(r"^diffusion_model\.blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)\.(lora_[AB]\.weight|alpha)$"),
    re.compile(r"^diffusion_model\.blocks\.\d+\.ffn\.(0|2)\.(lora_[AB]\.weight|alpha)$"),
    re.compile(r"^diffusion_model\.(head\.head|time_projection\.1|text_embedding\.0)\.lora_[AB]\.weight$"),
]


def _add_lora(transformer, targets, seed: int) -> None:
    from peft import LoraConfig

    transformer.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, init_lora_weights=True)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at zero: make the LoRA do something
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    transformer.eval()


def _inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, 2, 4, 4, generator=generator),
        "timestep": torch.tensor([700]),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
    }


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    return transformer(**_inputs(), return_dict=False)[0]


def _assert_same_forward(got: torch.Tensor, want: torch.Tensor, model: torch.nn.Module) -> None:
    """The same weights, put into the model by another route (diffusers' loader), give the same output
    up to float32 rounding (measured about 1e-6 apart, which moves with the CPU's kernels); a LoRA
    lost or loaded wrongly moves it by 5 % or more (test_diffusers_file_loads_with_the_trained_effect)."""
    torch.testing.assert_close(got, want, rtol=0, atol=forward_tolerance(model) * want.abs().max().item())


def _pipe(folder: Path):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def wan21(tiny_model) -> Path:
    return tiny_model("wan21")


@pytest.fixture(scope="module")
def base_out(wan21) -> torch.Tensor:
    return _out(_pipe(wan21).transformer)


@pytest.fixture(scope="module")
def trained(wan21):
    """(transformer with the LoRA, its output)."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(wan21, subfolder="transformer")
    _add_lora(transformer, BLOCK_TARGETS + GLOBAL_TARGETS, seed=1)
    return transformer, _out(transformer)


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_lora_state_dict_has_peft_names(trained):
    transformer, _ = trained
    state = lora_state_dict(transformer)
    assert "blocks.0.attn1.to_q.lora_A.weight" in state
    assert "blocks.1.ffn.net.2.lora_B.weight" in state
    assert "proj_out.lora_B.weight" in state
    # 2 blocks x 10 targets + 3 global modules, A and B each
    assert len(state) == 2 * (2 * len(BLOCK_TARGETS) + len(GLOBAL_TARGETS))


def test_diffusers_file_is_what_diffusers_writes(trained, tmp_path):
    from diffusers import WanPipeline

    transformer, _ = trained
    ours = save_lora(tmp_path / "ours.safetensors", transformer, rank=RANK, alpha=ALPHA,
                     output_format="DIFFUSERS", metadata={"video_trainer.steps": "12"}, dtype="fp32")
    WanPipeline.save_lora_weights(
        tmp_path / "theirs", transformer_lora_layers=lora_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    theirs = tmp_path / "theirs" / "pytorch_lora_weights.safetensors"
    a, b = load_file(ours), load_file(theirs)
    assert a.keys() == b.keys()
    assert all(k.startswith(("transformer.blocks.", "transformer.proj_out", "transformer.condition_")) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(ours, "pt") as f1, safe_open(theirs, "pt") as f2:
        m1, m2 = f1.metadata(), f2.metadata()
    assert m1["format"] == "pt" and m1["video_trainer.steps"] == "12"
    meta1, meta2 = json.loads(m1["lora_adapter_metadata"]), json.loads(m2["lora_adapter_metadata"])
    assert sorted(meta1.pop("transformer.target_modules")) == sorted(meta2.pop("transformer.target_modules"))
    assert meta1 == meta2
    assert meta1["transformer.lora_alpha"] == ALPHA and meta1["transformer.r"] == RANK


def test_diffusers_file_loads_with_the_trained_effect(trained, wan21, base_out, tmp_path):
    transformer, trained_out = trained
    assert _max_rel_err(trained_out, base_out) > 0.05  # the LoRA changes the output

    path = save_lora(tmp_path / "lora.safetensors", transformer, rank=RANK, alpha=ALPHA,
                     output_format="DIFFUSERS", metadata=None, dtype="fp32")
    pipe = _pipe(wan21)
    pipe.load_lora_weights(str(path))
    (config,) = pipe.transformer.peft_config.values()
    assert config.lora_alpha == ALPHA and config.r == RANK  # restored from the file's metadata
    _assert_same_forward(_out(pipe.transformer), trained_out, pipe.transformer)


def test_bf16_is_the_default_and_close(trained, wan21, tmp_path):
    transformer, trained_out = trained
    bf16 = save_lora(tmp_path / "bf16.safetensors", transformer, rank=RANK, alpha=ALPHA,
                     output_format="DIFFUSERS", metadata=None)
    fp32 = save_lora(tmp_path / "fp32.safetensors", transformer, rank=RANK, alpha=ALPHA,
                     output_format="DIFFUSERS", metadata=None, dtype="fp32")
    assert {t.dtype for t in load_file(bf16).values()} == {torch.bfloat16}
    assert bf16.stat().st_size < fp32.stat().st_size
    pipe = _pipe(wan21)
    pipe.load_lora_weights(str(bf16))
    assert _max_rel_err(_out(pipe.transformer), trained_out) < 2e-2

    comfy = save_lora(tmp_path / "comfy.safetensors", transformer, rank=RANK, alpha=ALPHA,
                      output_format="COMFY", metadata=None, comfy_keys=diffusers_to_comfy)
    tensors = load_file(comfy)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    pipe = _pipe(wan21)
    pipe.load_lora_weights(str(comfy))
    assert _max_rel_err(_out(pipe.transformer), trained_out) < 2e-2


def test_comfy_keys_alpha_and_roundtrip(trained, wan21, tmp_path):
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_wan_lora_to_diffusers,
    )

    transformer, trained_out = trained
    comfy_path = save_lora(tmp_path / "comfy.safetensors", transformer, rank=RANK, alpha=ALPHA,
                           output_format="COMFY", metadata={"note": "x"}, dtype="fp32",
                           comfy_keys=diffusers_to_comfy)
    comfy = load_file(comfy_path)
    for key in comfy:
        assert any(p.match(key) for p in COMFY_KEY_PATTERNS), key
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in comfy
    assert "diffusion_model.blocks.1.cross_attn.o.lora_B.weight" in comfy
    assert "diffusion_model.blocks.0.ffn.0.lora_A.weight" in comfy and "diffusion_model.blocks.0.ffn.2.lora_B.weight" in comfy
    alphas = {k: v for k, v in comfy.items() if k.endswith(".alpha")}
    assert len(alphas) == 2 * len(BLOCK_TARGETS)
    assert all(v.ndim == 0 and v.item() == ALPHA for v in alphas.values())
    with safe_open(comfy_path, "pt") as f:
        assert "lora_adapter_metadata" not in f.metadata() and f.metadata()["note"] == "x"

    # diffusers' own converter (non-diffusers Wan -> diffusers) gives back the diffusers keys and,
    # with alpha/rank folded in, the same update B @ A * scale per module.
    ours = {f"transformer.{k}": v for k, v in lora_state_dict(transformer).items()}
    converted = _convert_non_diffusers_wan_lora_to_diffusers(dict(comfy))
    assert converted.keys() == ours.keys()
    for key in (k for k in ours if k.endswith(".lora_A.weight")):
        b_key = key.replace(".lora_A.", ".lora_B.")
        want = ours[b_key] @ ours[key] * (ALPHA / RANK)
        torch.testing.assert_close(converted[b_key] @ converted[key], want, atol=1e-6, rtol=1e-5)

    # ...and WanPipeline.load_lora_weights detects and converts the file by itself.
    pipe = _pipe(wan21)
    pipe.load_lora_weights(str(comfy_path))
    _assert_same_forward(_out(pipe.transformer), trained_out, pipe.transformer)


def test_a14b_experts_get_their_own_files(tiny_model, tmp_path):
    a14b = tiny_model("wan22_a14b")
    pipe = _pipe(a14b)
    _add_lora(pipe.transformer, BLOCK_TARGETS, seed=2)
    _add_lora(pipe.transformer_2, BLOCK_TARGETS, seed=3)
    want = {"transformer": _out(pipe.transformer), "transformer_2": _out(pipe.transformer_2)}

    paths = expert_output_paths(tmp_path / "out" / "run.safetensors", ["transformer", "transformer_2"])
    assert paths == {"transformer": tmp_path / "out" / "run_high_noise.safetensors",
                     "transformer_2": tmp_path / "out" / "run_low_noise.safetensors"}
    for expert, path in paths.items():
        save_lora(path, getattr(pipe, expert), rank=RANK, alpha=ALPHA, output_format="DIFFUSERS",
                  metadata={"video_trainer.expert": expert}, dtype="fp32")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run_high_noise.safetensors", "run_low_noise.safetensors"]

    fresh = _pipe(a14b)
    fresh.load_lora_weights(str(paths["transformer"]))
    fresh.load_lora_weights(str(paths["transformer_2"]), load_into_transformer_2=True)
    for expert in ("transformer", "transformer_2"):
        _assert_same_forward(_out(getattr(fresh, expert)), want[expert], getattr(fresh, expert))
    assert not torch.allclose(want["transformer"], want["transformer_2"])


def test_expert_output_paths():
    assert expert_output_paths("x/wan.safetensors", ["transformer_2"]) == {"transformer_2": Path("x/wan_low_noise.safetensors")}
    with pytest.raises(ValueError):
        expert_output_paths("x/wan.safetensors", ["transformer_3"])
    with pytest.raises(UserError):
        expert_output_paths("x/wan.ckpt", ["transformer"])


def test_bad_paths_are_user_errors(trained, tmp_path):
    transformer, _ = trained
    with pytest.raises(UserError, match=r"\.safetensors"):
        save_lora(tmp_path / "lora.pt", transformer, rank=RANK, alpha=ALPHA, output_format="COMFY", metadata=None, comfy_keys=diffusers_to_comfy)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create the folder") as info:
        save_lora(blocker / "sub" / "lora.safetensors", transformer, rank=RANK, alpha=ALPHA, output_format="COMFY", metadata=None, comfy_keys=diffusers_to_comfy)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="format"):
        save_lora(tmp_path / "lora.safetensors", transformer, rank=RANK, alpha=ALPHA, output_format="KOHYA", metadata=None)


def test_failed_rename_leaves_no_file(trained, tmp_path, monkeypatch):
    import core.atomic

    transformer, _ = trained
    target = tmp_path / "out" / "lora.safetensors"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core.atomic.os, "replace", broken_replace)
    with pytest.raises(UserError, match="could not write"):
        save_lora(target, transformer, rank=RANK, alpha=ALPHA, output_format="DIFFUSERS", metadata=None)
    assert os.listdir(target.parent) == []  # neither the file nor a temporary one

    target.write_bytes(b"the previous run's file")
    with pytest.raises(UserError, match="could not write"):
        save_lora(target, transformer, rank=RANK, alpha=ALPHA, output_format="COMFY", metadata=None, comfy_keys=diffusers_to_comfy)
    assert target.read_bytes() == b"the previous run's file"
    assert os.listdir(target.parent) == ["lora.safetensors"]


def test_modules_without_a_comfy_name_are_refused():
    from core.export.comfy_wan import wan_module_name

    assert wan_module_name("blocks.7.attn2.add_k_proj") == ("blocks.7.cross_attn.k_img", True)
    assert wan_module_name("proj_out") == ("head.head", False)
    for module in ("patch_embedding", "blocks.0.norm2", "blocks.0.attn1.norm_q"):
        with pytest.raises(ValueError, match="no name"):
            wan_module_name(module)
