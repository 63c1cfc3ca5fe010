"""Quantized frozen weights (core/memory/quantize.py, quantize_cache.py) on the tiny Wan models."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("optimum.quanto")
pytest.importorskip("bitsandbytes")

from diffusers import WanTransformer3DModel
from peft import LoraConfig

from core.memory.known_models import KNOWN_MODELS
from core.memory.model_sizes import wan_transformer_sizes
from core.memory.quantize import (
    fuse_lora_refusal,
    merged_copy,
    quantize_model,
    quantized_layer_names,
)
from core.memory.quantize_cache import load_quantized_part, quantized_cache_path
from core.models.tiny import build_tiny_model
from core.train.run_info import part_summary

FORMATS = {"FLOAT_8": "qfloat8_e4m3fn", "INT_8": "qint8", "INT_4": "qint4", "NFLOAT_4": "nf4"}
TARGETS = ["attn1.to_q", "attn1.to_v", "attn2.to_k", "ffn.net.0.proj", "ffn.net.2"]
BLOCK_LAYER = re.compile(r"blocks\.\d+\.")


# numerics: results depend on float kernels (docs/testing.md)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def wan21(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan21")


def _load(folder: Path, dtype: torch.dtype = torch.bfloat16) -> WanTransformer3DModel:
    return WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).requires_grad_(False)


def _inputs(dtype: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype), "timestep": torch.tensor([400.0]),
            "encoder_hidden_states": torch.randn(1, 7, 32, generator=g).to(dtype), "return_dict": False}


def _add_lora(model: WanTransformer3DModel) -> None:
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=True))
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes the LoRA's effect visible
            p.data = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)


@pytest.mark.parametrize("weight_dtype", sorted(FORMATS))
def test_only_block_linears_are_quantized_and_everything_is_frozen(wan21: Path, weight_dtype: str) -> None:
    model = _load(wan21)
    report = quantize_model(model, weight_dtype)
    summary = part_summary(model)
    assert set(summary["quantized_bytes_by_format"]) == {FORMATS[weight_dtype]}
    assert summary["trainable_parameters"] == 0  # quanto leaves requires_grad=True; quantize_model freezes
    quantized = set(quantized_layer_names(model))
    assert quantized == set(report.quantized) and quantized
    assert all(BLOCK_LAYER.match(name) for name in quantized)
    for outside in ("proj_out", "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1"):
        assert type(model.get_submodule(outside)) is torch.nn.Linear
    assert type(model.patch_embedding) is torch.nn.Conv3d
    every_block_linear = {n for n, m in _load(wan21).named_modules() if isinstance(m, torch.nn.Linear) and BLOCK_LAYER.match(n)}
    if weight_dtype == "INT_8":
        # torch's CPU int8 kernel crashes for input widths that are not multiples of 16 (the tiny
        # model's 24); those layers are left as they are, named in the report.
        assert set(report.skipped) | quantized == every_block_linear
        assert all(model.get_submodule(n).in_features % 16 == 0 for n in quantized)
        assert all("multiple of 16" in why for why in report.skipped.values())
    else:
        assert quantized == every_block_linear and not report.skipped
    # The bytes are exactly what the estimator's formula says for this weight_dtype.
    config = json.loads((wan21 / "transformer" / "config.json").read_text())
    if weight_dtype != "INT_8":
        assert summary["weight_bytes"] == wan_transformer_sizes(config).total_bytes(weight_dtype)
    assert report.bytes_after == summary["weight_bytes"]
    if weight_dtype != "NFLOAT_4":  # NF4's two code tables (1.1 KB per layer) outweigh 576-weight layers
        assert report.bytes_after < report.bytes_before


def test_real_width_layers_shrink_as_promised() -> None:
    # The tiny model's 24-wide rows make per-row scales and code tables dominate; at the real
    # Wan 2.1 1.3B width (1536 inputs, an attention projection) the ratios are the real ones.
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(1536, 1536)).to(torch.bfloat16).requires_grad_(False)
    bf16 = part_summary(reference)["weight_bytes"]
    ratios = {}
    for weight_dtype in ("FLOAT_8", "NFLOAT_4"):
        layer = torch.nn.Sequential(torch.nn.Linear(1536, 1536)).to(torch.bfloat16).requires_grad_(False)
        layer[0].weight.data.copy_(reference[0].weight)
        quantize_model(layer, weight_dtype, include=lambda name, module: isinstance(module, torch.nn.Linear))
        ratios[weight_dtype] = part_summary(layer)["weight_bytes"] / bf16
    assert ratios["FLOAT_8"] <= 0.55 and ratios["NFLOAT_4"] <= 0.30, ratios
    # Whole transformers at their real sizes (model_sizes' formula, checked exactly above and in
    # test_estimate.py against part_summary): the parts left in bfloat16 are about 2%.
    for hub_id in ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers"):
        sizes = wan_transformer_sizes(KNOWN_MODELS[hub_id].transformers[0])
        full = sizes.total_bytes("BFLOAT_16")
        assert sizes.total_bytes("FLOAT_8") <= 0.55 * full, hub_id
        assert sizes.total_bytes("NFLOAT_4") <= 0.30 * full, hub_id


@pytest.mark.parametrize("weight_dtype", ["FLOAT_8", "INT_4", "NFLOAT_4"])
def test_lora_trains_on_top_of_quantized_layers(wan21: Path, weight_dtype: str) -> None:
    model = _load(wan21)
    quantize_model(model, weight_dtype)
    frozen_before = {n: part_summary(m)["weight_bytes"] for n, m in model.named_modules() if n in quantized_layer_names(model)}
    _add_lora(model)
    if weight_dtype == "NFLOAT_4":  # peft's bitsandbytes-aware layer, chosen through is_loaded_in_4bit
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

        assert isinstance(model.blocks[0].attn1.to_q, PeftLinear4bit)
    model.train()
    out = model(**_inputs())[0]
    out.float().pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == with_grad
    after = {n: part_summary(model.get_submodule(n).get_base_layer())["weight_bytes"] if hasattr(model.get_submodule(n), "get_base_layer")
             else part_summary(model.get_submodule(n))["weight_bytes"] for n in frozen_before}
    assert after == frozen_before  # the quantized storage is what it was


def test_lora_from_a_float8_run_loads_into_an_unquantized_pipeline(wan21: Path, tmp_path: Path) -> None:
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    from core.export.lora import save_lora

    model = _load(wan21)
    quantize_model(model, "FLOAT_8")
    _add_lora(model)
    path = save_lora(tmp_path / "lora.safetensors", model, rank=4, alpha=4, dtype="fp32")
    pipe = WanPipeline.from_pretrained(wan21, dtype=torch.float32)
    assert not quantized_layer_names(pipe.transformer)
    pipe.load_lora_weights(str(path), adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    trained = get_peft_model_state_dict(model)
    assert set(loaded) == set(trained)
    for key, value in trained.items():
        assert torch.equal(loaded[key].float(), value.float()), key


def test_the_cache_is_used_on_the_second_load_and_gives_the_same_model(wan21: Path, tmp_path: Path) -> None:
    first, report1 = load_quantized_part(wan21, "transformer", "FLOAT_8", cache_dir=tmp_path)
    files = list((tmp_path / "quantized").glob("*.safetensors"))
    assert len(files) == 1 and not report1.from_cache
    second, report2 = load_quantized_part(wan21, "transformer", "FLOAT_8", cache_dir=tmp_path)
    assert report2.from_cache and report2.quantized == report1.quantized
    assert part_summary(second) == part_summary(first)
    assert {n: (p.dtype, type(p)) for n, p in second.named_parameters()} == {n: (p.dtype, type(p)) for n, p in first.named_parameters()}
    with torch.no_grad():
        assert torch.equal(first(**_inputs())[0], second(**_inputs())[0])
    # And it trains like the first: LoRA on top, gradients only there.
    _add_lora(second)
    second.train()
    second(**_inputs())[0].float().mean().backward()
    assert all("lora_" in n for n, p in second.named_parameters() if p.grad is not None)


def test_nf4_cache_roundtrip(wan21: Path, tmp_path: Path) -> None:
    first, _ = load_quantized_part(wan21, "transformer", "NFLOAT_4", cache_dir=tmp_path)
    second, report = load_quantized_part(wan21, "transformer", "NFLOAT_4", cache_dir=tmp_path)
    assert report.from_cache and getattr(second, "is_loaded_in_4bit", False)
    with torch.no_grad():
        assert torch.equal(first(**_inputs())[0], second(**_inputs())[0])


def test_cache_key_follows_weights_and_dtype(wan21: Path, tmp_path: Path) -> None:
    other = build_tiny_model("wan21", tmp_path / "other", seed=1)  # same config, other weights
    names = ["blocks.0.attn1.to_q"]
    path = quantized_cache_path(tmp_path, wan21 / "transformer", "FLOAT_8", names)
    assert path == quantized_cache_path(tmp_path, wan21 / "transformer", "FLOAT_8", names)
    assert path != quantized_cache_path(tmp_path, other / "transformer", "FLOAT_8", names)
    assert path != quantized_cache_path(tmp_path, wan21 / "transformer", "INT_4", names)
    assert path != quantized_cache_path(tmp_path, wan21 / "transformer", "FLOAT_8", [*names, "blocks.0.attn1.to_k"])


def test_a_damaged_cache_file_is_replaced(wan21: Path, tmp_path: Path) -> None:
    load_quantized_part(wan21, "transformer", "INT_4", cache_dir=tmp_path)
    (cached,) = (tmp_path / "quantized").glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    _, report = load_quantized_part(wan21, "transformer", "INT_4", cache_dir=tmp_path)
    assert not report.from_cache and report.quantized
    assert load_quantized_part(wan21, "transformer", "INT_4", cache_dir=tmp_path)[1].from_cache


def test_fusing_into_quantized_weights_is_refused_and_done_on_a_dequantized_copy(wan21: Path) -> None:
    plain = _load(wan21)
    _add_lora(plain)
    assert fuse_lora_refusal(plain) is None
    model = _load(wan21)
    quantize_model(model, "INT_4")
    _add_lora(model)
    message = fuse_lora_refusal(model)
    assert message and "transformer.weight_dtype" in message and "dequantized copy" in message
    with torch.no_grad():
        expected = model(**_inputs())[0].float()
        merged = merged_copy(model)
        got = merged(**_inputs())[0].float()
    assert not quantized_layer_names(merged) and fuse_lora_refusal(merged) is None
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert type(merged.blocks[0].attn1.to_q) is torch.nn.Linear
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()  # bfloat16 rounding only
    assert quantized_layer_names(model) and any("lora_" in n for n, _ in model.named_parameters())  # original untouched


def test_quantizing_after_the_lora_is_refused(wan21: Path) -> None:
    model = _load(wan21)
    _add_lora(model)
    with pytest.raises(ValueError, match="before adding the LoRA"):
        quantize_model(model, "FLOAT_8")
