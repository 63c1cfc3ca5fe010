"""The HunyuanVideo size table against the real diffusers class, and the Hunyuan Video presets' estimates.

The parameter formula of core/memory/model_sizes.py is pinned to diffusers' HunyuanVideoTransformer3DModel
by building it at small configs (with and without the guidance embedder, a temporal patch, several
refiner blocks) and at the built-in hunyuanvideo-community/HunyuanVideo config on the meta device.
The activation count is not measured for these blocks (see docs/memory.md)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.config import load_preset_overlay, resolve
from core.memory.estimate import estimate_memory
from core.memory.known_models import KNOWN_MODELS
from core.memory.model_sizes import transformer_sizes
from core.memory.part_sizes import text_encoder_part

GIB = 1024**3
CLASS = {"_class_name": "HunyuanVideoTransformer3DModel"}
TINY = dict(num_attention_heads=2, attention_head_dim=10, text_embed_dim=12, pooled_projection_dim=14,
            rope_axes_dim=(2, 4, 4), in_channels=4, out_channels=4)


@pytest.mark.parametrize("extra", [
    {"num_layers": 1, "num_single_layers": 2, "num_refiner_layers": 1, "mlp_ratio": 2.0},
    {"num_layers": 2, "num_single_layers": 1, "num_refiner_layers": 2, "guidance_embeds": False, "patch_size_t": 2,
     "out_channels": 8},
    {"num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1, "num_attention_heads": 3, "attention_head_dim": 8,
     "rope_axes_dim": (2, 2, 4), "qk_norm": None},
])
def test_hunyuan_video_parameters_match_the_diffusers_class(extra: dict[str, Any]) -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    config = {**TINY, **extra}
    model = HunyuanVideoTransformer3DModel(**config)
    sizes = transformer_sizes({**CLASS, **config})
    assert sizes.parameters() == sum(p.numel() for p in model.parameters())
    dual, single = sizes.block_stacks()
    assert (dual.name, dual.count, single.name, single.count) == ("transformer_blocks", config["num_layers"],
                                                                  "single_transformer_blocks", config["num_single_layers"])
    assert dual.block_bytes("FLOAT_32") == 4 * sum(p.numel() for p in model.transformer_blocks[0].parameters())
    assert single.block_bytes("FLOAT_32") == 4 * sum(p.numel() for p in model.single_transformer_blocks[0].parameters())
    assert sizes.n_blocks == len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert sizes.joint_text and sizes.text_tokens == 256 and sizes.buffer_bytes == 0
    # Every Linear of both stacks is named, with its shape.
    for stack, module in ((dual, model.transformer_blocks[0]), (single, model.single_transformer_blocks[0])):
        linears = {n: (m.in_features, m.out_features) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
        assert {n: (i, o) for n, i, o in stack.linears} == linears


def test_the_built_in_hunyuan_video_config_builds_the_real_class() -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    known = KNOWN_MODELS["hunyuanvideo-community/HunyuanVideo"]
    (config,) = known.transformers
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel.from_config(config)
        defaults = HunyuanVideoTransformer3DModel()  # what diffusers' convert script builds
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in defaults.parameters()) == transformer_sizes(config).parameters()
    assert 12.8e9 < count < 12.9e9  # "13B"
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo()
        llama = LlamaModel(LlamaConfig(**known.text_encoders["text_encoder"]))
        clip = CLIPTextModel(CLIPTextConfig(**known.text_encoders["text_encoder_2"]))
    assert {k: known.vae[k] for k in ("z_dim", "scale_factor_spatial", "scale_factor_temporal")} == {
        "z_dim": 16, "scale_factor_spatial": 8, "scale_factor_temporal": 4}
    assert list(vae.config.block_out_channels) == known.vae["block_out_channels"]
    assert known.vae["parameters"] == sum(p.numel() for p in vae.parameters())
    # The parts list's counts from the built-in configs are the classes' own.
    parts = {name: text_encoder_part(name, config) for name, config in known.text_encoders.items()}
    assert parts["text_encoder"].parameters == sum(p.numel() for p in llama.parameters())
    assert parts["text_encoder_2"].parameters == sum(p.numel() for p in clip.parameters())


def test_offloading_counts_blocks_of_both_stacks() -> None:
    sizes = transformer_sizes(KNOWN_MODELS["hunyuanvideo-community/HunyuanVideo"].transformers[0])
    each = sizes.each_block_bytes("FLOAT_8")
    assert len(each) == 60 and each[0] > each[-1]  # a dual-stream block is larger than a single-stream one
    assert sizes.blocks_bytes("FLOAT_8", [], 0) == sum(each)
    assert sizes.blocks_bytes("FLOAT_8", [0, 59], 1) == sum(each) - each[59]  # the larger one in flight


def _preset(name: str) -> dict[str, Any]:
    return resolve(load_preset_overlay(name))


def test_hunyuan_video_presets_fit_their_gpus() -> None:
    # The numbers the presets' descriptions give (python main.py estimate --preset ...).
    lora = estimate_memory(_preset("#hunyuan video LoRA"))
    small = estimate_memory(_preset("#hunyuan video LoRA 16GB"))
    assert lora.details["blocks"] == 60 and lora.details["tokens"] == 9 * 32 * 32
    assert 21 * GIB < lora.needed_bytes < 22 * GIB and lora.fits(24 * GIB)
    assert small.details["offloaded_blocks"] == 30
    assert 11.5 * GIB < small.needed_bytes < 12.5 * GIB and small.fits(16 * GIB)
    finetune = estimate_memory(_preset("#hunyuan video Finetune"))
    assert 33 * GIB < finetune.needed_bytes < 34 * GIB and finetune.fits(40 * GIB)
    embedding = estimate_memory(_preset("#hunyuan video Embedding"))
    assert embedding.details["offloaded_blocks"] == 45
    assert 22 * GIB < embedding.needed_bytes < 23 * GIB and embedding.fits(24 * GIB)
    # Both encoders run in the graph with EMBEDDING: their weights are the Llama's and CLIP's own
    # (the parts list's, sized by their layouts), not a T5's of the default size.
    in_graph = [p for p in embedding.details["parts"] if p["name"] in ("text_encoder", "text_encoder_2")]
    assert [(p["kind"], p["when"]) for p in in_graph] == [("llama", "training"), ("clip_text_model", "training")]
    frozen = estimate_memory(_preset("#hunyuan video Embedding") | {"training_method": "LORA"}
                             | {"lora": {**_preset("#hunyuan video Embedding")["lora"], "rank": 1}})
    assert embedding.parts["weights"] - frozen.parts["weights"] == sum(p["bytes"] for p in in_graph)
    # LoRA on the attention projections of both stacks (rank 32): 8 Linears per dual block, 3 per single.
    dual, single = transformer_sizes(KNOWN_MODELS["hunyuanvideo-community/HunyuanVideo"].transformers[0]).block_stacks()
    assert (len(dual.lora_defaults), len(single.lora_defaults)) == (8, 3)
    expected = sum(32 * (i + o) * stack.count for stack in (dual, single) for n, i, o in stack.linears if n.startswith("attn."))
    assert lora.details["trained_parameters"] == expected
