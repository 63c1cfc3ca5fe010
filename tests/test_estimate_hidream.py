"""The HiDreamImageTransformer2DModel size table against the real diffusers class, and the HiDream presets' estimates.

The parameter formula of core/memory/model_sizes.py is pinned to diffusers' HiDreamImageTransformer2DModel
by building it at small configs (with routed experts and without, the MoE's inner widths rounded up
to 256) and at the built-in HiDream-ai/HiDream-I1-Full config on the meta device. The activation count
is Wan's block formula, not measured for these blocks (see docs/memory.md)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.config import load_preset_overlay, resolve
from core.memory.estimate import estimate_memory
from core.memory.known_models import KNOWN_MODELS
from core.memory.model_sizes import transformer_sizes

GIB = 1024**3
CLASS = {"_class_name": "HiDreamImageTransformer2DModel"}
TINY = {"patch_size": 2, "in_channels": 16, "attention_head_dim": 8, "num_attention_heads": 4, "caption_channels": [32, 48],
        "text_emb_dim": 40, "axes_dims_rope": (4, 2, 2), "llama_layers": [0, 1, 2]}


@pytest.mark.parametrize("extra", [
    {"num_layers": 1, "num_single_layers": 2, "num_routed_experts": 4, "num_activated_experts": 2},
    {"num_layers": 2, "num_single_layers": 1, "num_routed_experts": 0, "out_channels": 8},
    {"num_layers": 1, "num_single_layers": 1, "num_routed_experts": 3, "num_activated_experts": 1,
     "num_attention_heads": 20, "attention_head_dim": 16, "axes_dims_rope": (8, 4, 4)},
])
def test_hidream_parameters_match_the_diffusers_class(extra: dict[str, Any]) -> None:
    from diffusers import HiDreamImageTransformer2DModel

    config = {**TINY, **extra}
    model = HiDreamImageTransformer2DModel(**config)
    sizes = transformer_sizes({**CLASS, **config})
    assert sizes.parameters() == sum(p.numel() for p in model.parameters())
    dual, single = sizes.block_stacks()
    assert (dual.name, dual.count, single.name, single.count) == ("double_stream_blocks", config["num_layers"],
                                                                  "single_stream_blocks", config["num_single_layers"])
    assert dual.block_bytes("FLOAT_32") == 4 * sum(p.numel() for p in model.double_stream_blocks[0].parameters())
    assert single.block_bytes("FLOAT_32") == 4 * sum(p.numel() for p in model.single_stream_blocks[0].parameters())
    assert sizes.joint_text and sizes.buffer_bytes == 0
    # Every Linear of both stacks is named, with its shape and whether it has a bias.
    for stack, module in ((dual, model.double_stream_blocks[0]), (single, model.single_stream_blocks[0])):
        linears = {n: (m.in_features, m.out_features) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
        assert {n: (i, o) for n, i, o in stack.linears} == linears
        assert stack.unbiased == {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is None}


def test_the_built_in_hidream_config_builds_the_real_class() -> None:
    from diffusers import HiDreamImageTransformer2DModel

    known = KNOWN_MODELS["HiDream-ai/HiDream-I1-Full"]
    (config,) = known.transformers
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == transformer_sizes(config).parameters()
    assert 17.0e9 < count < 17.2e9  # "17B"
    assert known.vae == {"z_dim": 16, "scale_factor_spatial": 8, "scale_factor_temporal": 1}


def _preset(name: str) -> dict[str, Any]:
    return resolve(load_preset_overlay(name))


def test_hidream_presets_fit_their_gpus() -> None:
    # The numbers the presets' descriptions give (python main.py estimate --preset ...).
    lora = estimate_memory(_preset("#hidream LoRA"))
    small = estimate_memory(_preset("#hidream LoRA 16GB"))
    assert lora.details["blocks"] == 48 and lora.details["tokens"] == 64 * 64  # one 1024 px image
    assert 21 * GIB < lora.needed_bytes < 22 * GIB and lora.fits(24 * GIB)
    assert small.details["offloaded_blocks"] == 24
    assert 12 * GIB < small.needed_bytes < 13 * GIB and small.fits(16 * GIB) and small.needed_bytes < 16 * GIB
    # LoRA on the image stream's attention projections of both stacks (rank 32): 4 Linears per block.
    dual, single = transformer_sizes(KNOWN_MODELS["HiDream-ai/HiDream-I1-Full"].transformers[0]).block_stacks()
    assert len(dual.lora_defaults) == len(single.lora_defaults) == 4
    assert lora.details["trained_parameters"] == 32 * (2560 + 2560) * 4 * 48
    # FINE_TUNE: every transformer weight in bfloat16, Adafactor's factored state, the fused backward.
    tune = estimate_memory(_preset("#hidream Finetune"))
    assert tune.details["trained_parameters"] == 17_105_733_184 and tune.details["fused_backward"]
    assert 37 * GIB < tune.needed_bytes < 39 * GIB and tune.fits(48 * GIB)


# -- the Llama (text_encoder_4): kept loaded, or cached -------------------------------------------------


@pytest.mark.parametrize("weight_dtype", ["FLOAT_32", "BFLOAT_16", "FLOAT_8", "INT_4", "NFLOAT_4"])
def test_the_llama_weight_bytes_match_the_loaded_encoder(tiny_model, weight_dtype: str) -> None:
    """The adapter's own load (LlamaModel without the LM head, its decoder layers' Linears quantized)."""
    import json

    from core.memory.text_sizes import text_encoder_weight_bytes
    from core.models.dtypes import compute_dtype
    from core.models.hidream import HiDreamAdapter
    from core.train.run_info import part_summary

    folder = tiny_model("hidream")
    config = json.loads((folder / "text_encoder_4" / "config.json").read_text(encoding="utf-8"))
    encoder = HiDreamAdapter(folder).load_text_encoder("cpu", compute_dtype(weight_dtype), weight_dtype, name="text_encoder_4")
    assert part_summary(encoder)["weight_bytes"] == text_encoder_weight_bytes(config, weight_dtype)


def test_the_built_in_llama_config_builds_the_8b_decoder() -> None:
    from transformers import LlamaConfig, LlamaModel

    from core.memory.text_sizes import decoder_parameters

    config = KNOWN_MODELS["HiDream-ai/HiDream-I1-Full"].other_text_encoders()["text_encoder_4"]
    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(**config))
    count = sum(p.numel() for p in model.parameters())
    assert count == decoder_parameters(config) and 7.4e9 < count < 7.6e9  # 8.03 B with its 0.53 B LM head


def test_keep_loaded_counts_the_llama_and_cached_counts_its_cache(tiny_model) -> None:
    from core.models.hidream import HiDreamAdapter

    base = {"model_type": "HIDREAM", "base_model": "HiDream-ai/HiDream-I1-Full", "frames": 1, "resolution": 1024,
            "text_encoder_4": {"weight_dtype": "NFLOAT_4"}}
    cached = estimate_memory(resolve(base))
    kept = estimate_memory(resolve({**base, "text_encoder_4": {"weight_dtype": "NFLOAT_4", "keep_loaded": True}}))
    (llama,) = kept.details["kept_text_encoders"].values()
    assert kept.parts["weights"] - cached.parts["weights"] == llama and 4.0 * GIB < llama < 4.7 * GIB
    assert not cached.details["kept_text_encoders"] and not kept.details["text_cache_bytes_per_caption"]
    # 32 distinct layers x 128 tokens x 4096 in bfloat16 (NFLOAT_4 computes in it): 32 MiB a caption.
    assert cached.details["text_cache_bytes_per_caption"] == {"text_encoder_4": 32 * 128 * 4096 * 2}
    # The tiny folder's figure is what its encoder really gives a caption, in float32.
    folder = tiny_model("hidream")
    adapter = HiDreamAdapter(folder)
    for name in adapter.text_encoder_names:
        adapter.load_text_encoder("cpu", torch.float32, name=name)
    per_caption = adapter.encode_text(["a cat"])["llama_embeds"][0]
    tiny = estimate_memory(resolve({"model_type": "HIDREAM", "base_model": str(folder), "frames": 1, "resolution": 64,
                                    "text_encoder_4": {"weight_dtype": "FLOAT_32"}}))
    assert tiny.details["text_cache_bytes_per_caption"] == {"text_encoder_4": per_caption.nbytes}


def test_an_image_model_is_estimated_at_one_frame_whatever_frames_says() -> None:
    """HiDream trains every sample as one frame (its adapter's FrameRule.still()); a config that
    keeps the video default of `frames` (16) gets the one-image estimate, as the data plan trains."""
    preset = _preset("#hidream LoRA")
    one, sixteen = estimate_memory(preset | {"frames": 1}), estimate_memory(preset | {"frames": 16})
    assert sixteen.details["frames"] == 1 and sixteen.details["tokens"] == 64 * 64
    assert sixteen.needed_bytes == one.needed_bytes
