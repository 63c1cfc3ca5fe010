"""The VRAM estimator (core/memory/estimate.py, model_sizes.py, known_models.py) and 'main.py estimate'.

Its parts are checked against the real classes on a CPU: weight bytes against part_summary, block
activations against the tensors autograd saves, and a whole training step against the peak of live
tensor bytes TensorMemoryProbe measures. GPU-only constants are in docs/memory.md.
"""

from __future__ import annotations

import dataclasses

import json
import re
from pathlib import Path

import pytest
import torch

from core.cli import build_parser, run
from core.config import list_presets, load_preset_overlay, resolve
from core.memory.estimate import (
    GIB,
    block_activation_bytes,
    estimate_memory,
    text_encoder_activation_bytes,
)
from core.memory.fit import propose_fit
from core.memory.known_models import KNOWN_MODELS, model_configs
from core.memory.model_sizes import text_encoder_sizes, wan_transformer_sizes
from core.memory.probe import TensorMemoryProbe

TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]  # the Wan adapter's defaults


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _preset(name: str, **changes: object) -> dict:
    overlay = load_preset_overlay(name)
    return resolve(overlay, changes, source=name)


def _estimate_cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    parser, _ = build_parser()
    code = run(parser, ["estimate", *args])
    out, err = capsys.readouterr()
    return code, out, err


# -- sizes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["wan21", "wan22_ti2v_5b"])
def test_weight_bytes_match_the_real_model(family: str, tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    from core.memory.quantize import quantize_model
    from core.models.tiny import build_tiny_model
    from core.train.run_info import part_summary

    folder = build_tiny_model(family, tmp_path / family)
    sizes = wan_transformer_sizes(json.loads((folder / "transformer" / "config.json").read_text()))
    for weight_dtype in ("FLOAT_32", "BFLOAT_16", "FLOAT_8", "INT_4", "NFLOAT_4"):
        dtype = torch.float32 if weight_dtype == "FLOAT_32" else torch.bfloat16
        model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
        if weight_dtype not in ("FLOAT_32", "BFLOAT_16"):
            quantize_model(model, weight_dtype)
        summary = part_summary(model)
        assert summary["weight_bytes"] == sizes.total_bytes(weight_dtype), weight_dtype
        assert summary["parameters"] == sizes.parameters()
        assert part_summary(model.blocks[0])["weight_bytes"] == sizes.block_bytes(weight_dtype)


def test_known_configs_build_the_real_classes() -> None:
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    counts = {}
    for hub_id, known in KNOWN_MODELS.items():
        config = known.transformers[0]
        if config.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
            continue  # the other families: tests/test_estimate_cogvideox.py
        with init_empty_weights():
            model = WanTransformer3DModel.from_config(config)
        counts[hub_id] = sum(p.numel() for p in model.parameters())
        assert counts[hub_id] == wan_transformer_sizes(config).parameters(), hub_id
    # The published sizes: 1.3B, 5B, 14B.
    assert 1.3e9 < counts["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"] < 1.5e9
    assert 4.9e9 < counts["Wan-AI/Wan2.2-TI2V-5B-Diffusers"] < 5.1e9
    assert 14e9 < counts["Wan-AI/Wan2.1-T2V-14B-Diffusers"] < 14.5e9
    text = KNOWN_MODELS["Wan-AI/Wan2.2-TI2V-5B-Diffusers"].text_encoder
    with torch.device("meta"):  # (accelerate's init_empty_weights skips tying shared to embed_tokens)
        encoder = UMT5EncoderModel(UMT5Config(**text))
    assert sum(p.numel() for p in encoder.parameters()) == text_encoder_sizes(text).parameters()


# -- activations --------------------------------------------------------------------------------------


def _saved_bytes(run_forward, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves during run_forward(), minus those in exclude."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_forward()
    return sum(size for key, size in saved.items() if key not in exclude)


@pytest.mark.parametrize(("dim", "ffn", "tokens", "text", "dtype", "per_token"), [
    (96, 256, 120, 40, torch.bfloat16, False),
    (192, 384, 200, 64, torch.bfloat16, False),
    (96, 256, 120, 40, torch.float32, False),
    (96, 256, 120, 40, torch.bfloat16, True),
])
def test_block_activations_match_what_autograd_saves(dim: int, ffn: int, tokens: int, text: int, dtype: torch.dtype, per_token: bool) -> None:
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from peft import LoraConfig, inject_adapter_in_model

    heads, rank = dim // 24, 8
    torch.manual_seed(0)
    block = WanTransformerBlock(dim, ffn, heads, "rms_norm_across_heads", True, 1e-6).requires_grad_(False).to(dtype)
    # As the trainer has it: diffusers' _keep_in_fp32_modules in float32, the LoRA in float32.
    for name, p in block.named_parameters():
        if name.startswith(("norm2.", "scale_shift_table")):
            p.data = p.data.float()
    block = inject_adapter_in_model(LoraConfig(r=rank, target_modules=TARGETS), block)
    for p in block.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    x = torch.randn(1, tokens, dim, dtype=dtype, requires_grad=True)
    encoder = torch.randn(1, text, dim, dtype=dtype)
    temb = torch.randn(1, tokens, 6, dim, dtype=dtype) if per_token else torch.randn(1, 6, dim, dtype=dtype)
    rope = (torch.randn(1, tokens, 1, 24), torch.randn(1, tokens, 1, 24))
    exclude = {t.untyped_storage()._cdata for t in [*block.parameters(), x, *rope]}
    b = 2 if dtype == torch.bfloat16 else 4

    def forward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=b == 2):
            block(x, encoder, temb, rope)

    measured = _saved_bytes(forward, exclude)
    sizes = wan_transformer_sizes({"num_attention_heads": heads, "attention_head_dim": 24, "ffn_dim": ffn, "num_layers": 1})
    from core.memory.estimate import lora_weight_cast_bytes

    predicted = block_activation_bytes(sizes, tokens, text, b, lora_rank=rank, per_token_timesteps=per_token)
    predicted += lora_weight_cast_bytes(sizes, list(sizes.linear_shapes().values()), rank, b)
    assert abs(predicted - measured) <= 0.08 * measured, (predicted, measured)


def test_text_encoder_activations_match_what_autograd_saves() -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    config = {"d_model": 64, "d_ff": 160, "d_kv": 16, "num_heads": 4, "num_layers": 3, "vocab_size": 100}
    model = UMT5EncoderModel(UMT5Config(**config, feed_forward_proj="gated-gelu", dropout_rate=0.0)).to(torch.bfloat16)
    model.requires_grad_(False)
    embeds = torch.randn(1, 48, 64, dtype=torch.bfloat16, requires_grad=True)
    exclude = {t.untyped_storage()._cdata for t in [*model.parameters(), embeds]}
    measured = _saved_bytes(lambda: model(inputs_embeds=embeds), exclude)
    predicted = text_encoder_activation_bytes(config, 48, 2)
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Wan transformer with the real architecture at proportions where activations dominate."""
    from diffusers import WanTransformer3DModel

    folder = tmp_path_factory.mktemp("small") / "model"
    torch.manual_seed(0)
    WanTransformer3DModel(num_attention_heads=4, attention_head_dim=24, in_channels=16, out_channels=16, text_dim=32,
                          freq_dim=256, ffn_dim=256, num_layers=4).save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(json.dumps({"scale_factor_spatial": 8, "scale_factor_temporal": 4}))
    return folder


@pytest.mark.parametrize("checkpointing", ["ON", "OFF"])
def test_estimate_matches_a_measured_cpu_step(small_model: Path, checkpointing: str) -> None:
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from core.train.objective import flow_matching_loss

    config = resolve({"base_model": str(small_model), "resolution": 192, "frames": 9, "batch_size": 1,
                      "gradient_checkpointing": checkpointing, "train_dtype": "BFLOAT_16", "lora": {"rank": 8, "alpha": 8.0},
                      "video_config": {"video_batch_size_multiplier": 1.0}})
    model = WanTransformer3DModel.from_pretrained(small_model / "transformer", torch_dtype=torch.bfloat16).requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing == "ON":
        model.enable_gradient_checkpointing()
    model.train()
    latents = torch.randn(1, 16, 3, 24, 24)  # 9 frames at 192 x 192 through an 8x / 4x VAE: 432 tokens
    noise, text, sigmas = torch.randn_like(latents), torch.randn(1, 512, 32), torch.full((1,), 0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with TensorMemoryProbe().track(model, latents, noise, text) as probe:
        for _ in range(2):  # the second step runs with the optimizer state in place, as every later step
            with torch.autocast("cpu", dtype=torch.bfloat16):
                prediction = model(hidden_states=(0.5 * latents + 0.5 * noise).to(torch.bfloat16), timestep=sigmas * 1000,
                                   encoder_hidden_states=text.to(torch.bfloat16), return_dict=False)[0]
            loss, _ = flow_matching_loss(prediction.float(), noise - latents, sigmas, {"loss_weighting": "NONE"}, 1.0)
            loss.backward()
            del prediction, loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    estimate = estimate_memory(config)
    measured = probe.peak["cpu"]
    assert abs(estimate.peak_bytes - measured) <= 0.15 * measured, (estimate.parts, measured)


# -- the estimate's behaviour -------------------------------------------------------------------------


def test_every_bundled_preset_gets_an_answer(capsys: pytest.CaptureFixture) -> None:
    bundled = [p.name for p in list_presets() if p.bundled]
    assert len(bundled) >= 5
    for name in bundled:
        code, out, err = _estimate_cli("--preset", name, "--vram", "24", "--json", capsys=capsys)
        assert code == 0, err
        result = json.loads(out)
        assert result["peak_bytes"] == sum(result["parts"].values()) > 0
        assert set(result["parts"]) == {"weights", "trainable_state", "activations", "workspace"}
        assert result["needed_bytes"] > result["peak_bytes"] and result["fits"] in (True, False)


def test_the_8gb_preset_fits_8_gib_and_the_16gb_one_16() -> None:
    for name in [p.name for p in list_presets() if p.bundled]:
        match = re.search(r"(\d+)\s*GB", name)
        if match:
            assert estimate_memory(_preset(name)).needed_bytes <= int(match.group(1)) * GIB, name
    assert estimate_memory(_preset("#wan 2.2 LoRA 8GB")).peak_bytes <= 8 * GIB
    assert estimate_memory(_preset("#wan 2.2 LoRA")).fits(16 * GIB)  # "for 16 GB GPUs"


def test_each_setting_moves_the_estimate_the_right_way() -> None:
    base = _preset("#wan 2.2 LoRA")
    parts = estimate_memory(base).parts
    offloaded = estimate_memory(_preset("#wan 2.2 LoRA", layer_offload_fraction=0.5)).parts
    assert offloaded["weights"] < 0.6 * parts["weights"]  # half the blocks, two of them in flight
    float8 = estimate_memory(_preset("#wan 2.2 LoRA", transformer={"weight_dtype": "FLOAT_8"})).parts
    assert float8["weights"] <= 0.55 * parts["weights"]
    nf4 = estimate_memory(_preset("#wan 2.2 LoRA", transformer={"weight_dtype": "NFLOAT_4"})).parts
    assert nf4["weights"] <= 0.30 * parts["weights"]
    activations = {c: estimate_memory(_preset("#wan 2.2 LoRA", gradient_checkpointing=c)).parts["activations"]
                   for c in ("OFF", "ON", "CPU_OFFLOADED")}
    assert activations["CPU_OFFLOADED"] < activations["ON"] < activations["OFF"] / 5
    bigger = estimate_memory(_preset("#wan 2.2 LoRA", frames=33, resolution=768, video_config={"max_frames": 33})).parts["activations"]
    assert bigger > 3 * activations["ON"]
    assert estimate_memory(_preset("#wan 2.2 LoRA", lora={"rank": 64})).parts["trainable_state"] > 3.5 * parts["trainable_state"]
    adam8 = estimate_memory(_preset("#wan 2.2 LoRA", optimizer="ADAMW_8BIT")).parts["trainable_state"]
    assert adam8 < parts["trainable_state"]
    a14b = estimate_memory(_preset("#wan 2.2 LoRA", base_model="Wan-AI/Wan2.2-T2V-A14B-Diffusers", model_type="WAN_2_2_A14B_T2V",
                                   video_config={"spatial_compression_ratio": 8}))
    assert a14b.details["transformers"] == 2 and a14b.parts["weights"] > 50 * GIB  # two 14B experts in bfloat16
    # One expert trained: only it is loaded (chosen_denoisers), so only it is counted.
    high = estimate_memory(_preset("#wan 2.2 LoRA", base_model="Wan-AI/Wan2.2-T2V-A14B-Diffusers", model_type="WAN_2_2_A14B_T2V",
                                   video_config={"spatial_compression_ratio": 8}, experts={"train": "HIGH_NOISE"}))
    assert high.details["transformers"] == 1 and 25 * GIB < high.parts["weights"] < 30 * GIB
    assert abs(2 * high.parts["trainable_state"] - a14b.parts["trainable_state"]) <= 16


def test_fit_offloads_first_then_quantizes() -> None:
    config = _preset("#wan 2.2 LoRA")
    # The training step's search alone: the text encoder and the VAE left unsized (no model_type; no
    # class or parameter count), so filling the caches needs nothing.
    built_in = model_configs(config["base_model"])
    training_only = dataclasses.replace(built_in, text_encoder={k: v for k, v in built_in.text_encoder.items() if k != "model_type"},
                                        vae={k: v for k, v in built_in.vae.items() if k not in ("_class_name", "parameters")})
    changes, result = propose_fit(config, 12 * GIB, training_only)
    assert set(changes) == {"layer_offload_fraction"} and result.fits(12 * GIB)
    assert changes["layer_offload_fraction"] < 1.0
    changes, result = propose_fit(config, 4 * GIB, training_only)  # offloading every block is enough
    assert changes == {"layer_offload_fraction": 1.0} and result.fits(4 * GIB)
    longer = _preset("#wan 2.2 LoRA", batch_size=4, frames=33, video_config={"max_frames": 33})
    changes, result = propose_fit(longer, 5 * GIB, training_only)  # activations too: CPU_OFFLOADED before quantizing
    assert changes == {"gradient_checkpointing": "CPU_OFFLOADED", "layer_offload_fraction": 1.0} and result.fits(5 * GIB)
    changes, result = propose_fit(longer, int(4.5 * GIB), training_only)  # and then FLOAT_8
    assert changes["transformer.weight_dtype"] == "FLOAT_8" and result.fits(int(4.5 * GIB))
    assert propose_fit(config, 64 * GIB, training_only)[0] == {}
    assert propose_fit(config, 1 * GIB, training_only) is None


def test_fit_stores_the_cached_text_encoder_lighter_where_filling_the_caches_does_not_fit() -> None:
    config = _preset("#wan 2.2 LoRA")
    # UMT5-XXL in BFLOAT_16 (10.6 GiB of weights) does not cache on a 12 GiB card; in FLOAT_8 it does.
    assert estimate_memory(config).caching_needed_bytes > 12 * GIB
    changes, result = propose_fit(config, 12 * GIB)
    assert changes["text_encoder.weight_dtype"] == "FLOAT_8" and "layer_offload_fraction" in changes
    assert result.fits(12 * GIB) and result.caching_needed_bytes <= 12 * GIB
    # Its 16-bit token embedding alone is 2 GiB: even NFLOAT_4 does not cache within 4 GiB.
    assert propose_fit(config, 4 * GIB) is None
    # 81 frames at 720: the Wan VAE's FLOAT_32 encoding is the stage that does not fit 8 GiB; in BFLOAT_16 it does.
    longer = _preset("#wan 2.2 LoRA 8GB", frames=81, resolution=720, video_config={"max_frames": 81})
    assert estimate_memory(longer).caching_needed_bytes > 8 * GIB
    changes, result = propose_fit(longer, 8 * GIB)
    assert changes["vae.weight_dtype"] == "BFLOAT_16" and "text_encoder.weight_dtype" not in changes and result.fits(8 * GIB)
    trained = _preset("#wan 2.2 LoRA", text_encoder={"train": True})
    fitted = propose_fit(trained, 12 * GIB)
    assert fitted is None or "text_encoder.weight_dtype" not in fitted[0]  # a trained encoder is not re-stored


def test_cli_table_fit_and_errors(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _estimate_cli("--preset", "#wan 2.2 LoRA", "--vram", "8", "--fit", "12", capsys=capsys)
    assert code == 0
    assert "Wan 2.2 TI2V-5B" in out and "does not fit in 8.0 GiB" in out
    assert "to fit 12 GiB" in out and "--set layer_offload_fraction=" in out
    code, out, _ = _estimate_cli("--preset", "#wan 2.2 LoRA 8GB", "--vram", "8", capsys=capsys)
    assert "fits in 8.0 GiB" in out and "does not" not in out
    code, _, err = _estimate_cli("--preset", "#wan 2.2 LoRA", "--set", "base_model=someone/unknown-model", capsys=capsys)
    assert code == 2 and "base_model" in err and "someone/unknown-model" in err and "Traceback" not in err
    code, _, err = _estimate_cli("--preset", "#wan 2.2 LoRA", "--vram", "-3", capsys=capsys)
    assert code == 2 and "--vram" in err


def test_local_folder_configs_are_read(small_model: Path) -> None:
    configs = model_configs(str(small_model))
    assert configs.source == str(small_model)
    assert configs.transformers[0]["ffn_dim"] == 256 and configs.vae["scale_factor_spatial"] == 8
