"""The CogVideoX size table against the real diffusers class, and the CogVideoX presets' estimates.

The parameter formula of core/memory/model_sizes.py is pinned to diffusers' CogVideoXTransformer3DModel
by building it at small configs (both patch embeddings, rotary or sincos positions, an ofs embedding)
and at the built-in CogVideoX-2b/5b configs on the meta device, and T5 v1.1 XXL to transformers'
T5EncoderModel. The activation count is not measured for this block (see docs/memory.md)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.config import load_preset_overlay, resolve
from core.memory.estimate import estimate_memory
from core.memory.known_models import KNOWN_MODELS
from core.memory.model_sizes import text_encoder_sizes, transformer_sizes

GIB = 1024**3
CLASS = {"_class_name": "CogVideoXTransformer3DModel"}
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=12, sample_width=8, sample_height=8, sample_frames=9, max_text_seq_length=5)


@pytest.mark.parametrize("extra", [
    {"num_layers": 2},  # 1.0 layout: Conv2d patches, sincos positions (a buffer)
    {"num_layers": 1, "in_channels": 8, "patch_size_t": 2, "patch_bias": False, "use_rotary_positional_embeddings": True,
     "ofs_embed_dim": 8},  # 1.5 layout: a Linear patch embedding, rotary positions, the ofs embedding
    {"num_layers": 3, "num_attention_heads": 3, "time_embed_dim": 16, "use_rotary_positional_embeddings": True,
     "use_learned_positional_embeddings": True, "norm_elementwise_affine": False},
])
def test_cogvideox_parameters_match_the_diffusers_class(extra: dict[str, Any]) -> None:
    from diffusers import CogVideoXTransformer3DModel

    config = {**TINY, **extra}
    model = CogVideoXTransformer3DModel(**config)
    sizes = transformer_sizes({**CLASS, **config})
    assert sizes.parameters() == sum(p.numel() for p in model.parameters())
    assert sizes.buffer_bytes == sum(b.numel() for b in model.buffers()) * 4
    block = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    assert sizes.block_bytes("FLOAT_32") == 4 * block
    assert sizes.joint_text and sizes.text_tokens == 5


def test_known_cogvideox_configs_build_the_real_class() -> None:
    from diffusers import CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    counts = {}
    for hub_id in ("THUDM/CogVideoX-2b", "THUDM/CogVideoX-5b", "THUDM/CogVideoX-5b-I2V"):
        config = KNOWN_MODELS[hub_id].transformers[0]
        with torch.device("meta"):
            model = CogVideoXTransformer3DModel.from_config(config)
        counts[hub_id] = sum(p.numel() for p in model.parameters())
        assert counts[hub_id] == transformer_sizes(config).parameters(), hub_id
    assert 1.6e9 < counts["THUDM/CogVideoX-2b"] < 1.8e9  # "2b" (1.69 B)
    assert 5.5e9 < counts["THUDM/CogVideoX-5b"] < 5.6e9  # "5b" (5.57 B)
    # The I2V's wider patch embedding (32 input channels) and its learned positional embeddings (a buffer).
    assert 0 < counts["THUDM/CogVideoX-5b-I2V"] - counts["THUDM/CogVideoX-5b"] < 1e6
    text = KNOWN_MODELS["THUDM/CogVideoX-5b"].text_encoder
    with torch.device("meta"):
        encoder = T5EncoderModel(T5Config(**text))
    assert sum(p.numel() for p in encoder.parameters()) == text_encoder_sizes(text).parameters()


def _preset(name: str) -> dict[str, Any]:
    return resolve(load_preset_overlay(name))


def test_cogvideox_presets_fit_their_gpus() -> None:
    # The numbers the presets' descriptions give (python main.py estimate --preset ...).
    lora = estimate_memory(_preset("#cogvideox LoRA"))
    small = estimate_memory(_preset("#cogvideox LoRA 12GB"))
    full = estimate_memory(_preset("#cogvideox Finetune"))
    assert lora.details["tokens"] == 13 * 30 * 30 and lora.details["blocks"] == 42
    assert 19 * GIB < lora.needed_bytes < 21 * GIB and lora.fits(24 * GIB)
    assert small.needed_bytes < 12 * GIB and 5 * GIB < small.needed_bytes < 6 * GIB
    assert 18 * GIB < full.needed_bytes < 20 * GIB and full.fits(24 * GIB)
    assert full.details["trained_parameters"] == transformer_sizes(KNOWN_MODELS["THUDM/CogVideoX-5b"].transformers[0]).parameters()


def test_the_i2v_preset_counts_the_models_one_size_and_fits_24_gb() -> None:
    # The 5b-I2V trains every clip at 480x720 (60x90 latent cells, 30x45 patches) whatever resolution says.
    estimate = estimate_memory(_preset("#cogvideox I2V LoRA"))
    assert (estimate.details["height"], estimate.details["width"]) == (30, 45)
    assert estimate.details["tokens"] == 13 * 30 * 45
    assert 23 * GIB < estimate.needed_bytes < 24 * GIB and estimate.fits(24 * GIB)
    t2v = estimate_memory(_preset("#cogvideox LoRA"))  # 480x480: fewer tokens, less memory
    assert t2v.details["height"] == t2v.details["width"] == 30 and t2v.needed_bytes < estimate.needed_bytes


def test_a_temporal_patch_counts_the_adapters_leading_copy(tiny_model) -> None:
    """CogVideoX 1.5 (patch_size_t 2): 9 frames are 3 latent frames, padded to 4 as the cache holds them."""
    from core.memory.known_models import configs_from_folder
    from core.models.registry import adapter_for

    folder = tiny_model("cogvideox15")
    config = resolve({"base_model": str(folder), "resolution": 64, "frames": 9, "video_config": {"max_frames": 9}})
    estimate = estimate_memory(config, configs_from_folder(folder))
    assert estimate.details["latent_frames"] == adapter_for(config).latent_frames(9) == 4
    assert estimate.details["tokens"] == 4 // 2 * 4 * 4
