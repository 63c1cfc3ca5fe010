"""Built-in configs of the models the estimator knows without their files, and how to find a model's configs.

When base_model is a local diffusers folder (or a hub id already in the local Hugging Face cache)
the estimator reads its own config.json files. Otherwise it uses these, keyed by hub id.

Sources of the numbers:
- transformers: diffusers' scripts/convert_wan_to_diffusers.py, get_transformer_config
  (huggingface/diffusers at 7d5682739a1ee5b25bb9f5a81c573ea7e38d8e22): "Wan-T2V-1.3B",
  "Wan-T2V-14B", "Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-14B-720p"; they match the Wan
  repositories' own wan/configs (dim 1536/5120/3072, ffn 8960/13824/14336, 30/40/30 layers).
- text encoder: google/umt5-xxl's config.json, the encoder every Wan model ships
  (d_model 4096, d_ff 10240, 24 layers, 64 heads of 64, vocabulary 256384, gated-gelu).
- VAE compression: Wan 2.1's VAE 8x spatial / 4x temporal, 16 latent channels; Wan 2.2's (TI2V-5B)
  16x spatial (8x plus a 2x2 patchify) / 4x temporal, 48 channels (wan/configs vae_stride).
- CogVideoX transformers: diffusers' scripts/convert_cogvideox_to_diffusers.py (huggingface/diffusers
  at 01337da7633c4c663e76e75550e6f9d94fa7dc97), get_args: "For CogVideoX-2B, num_layers is 30. For 5B,
  it is 42", num_attention_heads 30 / 48, use_rotary_positional_embeddings False for 2B / True for 5B;
  the rest (attention_head_dim 64, time_embed_dim 512, text_embed_dim 4096, patch_size 2, 49 frames,
  60x90 latents, max_text_seq_length 226) are CogVideoXTransformer3DModel.__init__'s defaults, which
  the script keeps. CogVideoX-5b-I2V: the same script's --i2v (same commit's convert_transformer:
  in_channels 32, use_learned_positional_embeddings). CogVideoX1.5-5B (and its I2V) is left out: no
  stored source of its config could be cited.
- CogVideoX text encoder: the same script loads google/t5-v1_1-xxl (T5EncoderModel; d_model 4096,
  d_ff 10240, 24 layers, 64 heads of 64, vocabulary 32128, gated-gelu).
- CogVideoX VAE: 8x spatial / 4x temporal, 16 latent channels (AutoencoderKLCogVideoX,
  temporal_compression_ratio 4, latent_channels 16; the transformer's 60x90 latents of 480x720 video).
- HunyuanVideo transformer (hunyuanvideo-community/HunyuanVideo): diffusers'
  scripts/convert_hunyuan_video_to_diffusers.py (huggingface/diffusers at
  04614753d0da1edf7f811ae6b4dae4ed4fa9919e), convert_transformer: the release's checkpoint loads
  with strict=True into `HunyuanVideoTransformer3DModel()`, so its config is that class's defaults
  (24 heads of 128, 20 dual-stream and 40 single-stream blocks, 2 refiner blocks, mlp_ratio 4,
  patch 2 x 2 x 1, guidance_embeds, text_embed_dim 4096, pooled_projection_dim 768): 12.82 B
  parameters. Its VAE: `AutoencoderKLHunyuanVideo()`'s defaults (16 latent channels, 8x spatial,
  4x temporal). Its text encoders, a Llama 3 8B (LlamaModel) and CLIP-L's text model: the configs
  kohya-ss/musubi-tuner builds them from (below), for the parts list and the caching figure.
- HiDream-I1-Full transformer (HiDream-ai/HiDream-I1-Full): scripts/convert_hidream_to_diffusers.py
  of hlky/diffusers at bd3e1965714fa791aa9f5f595782800e5ec82c8d (the conversion of that release's
  checkpoint written while HiDream was added to diffusers), which loads the release's transformer
  with strict=True into a model of this config: 20 heads of 128, 16 dual-stream and 32
  single-stream blocks, caption_channels [4096, 4096], text_emb_dim 2048, 4 routed experts of which 2
  are active, max_resolution 128 x 128, patch 2, 16 in and out channels, llama_layers 0..31 then 31
  sixteen times: 17.11 B parameters in HiDreamImageTransformer2DModel. Its VAE: 16 latent channels
  (the transformer's in_channels) and 8x spatial compression, no temporal compression
  (HiDreamImagePipeline: default_sample_size 128 latent cells make its default 1024 px image).
  HiDream-I1-Dev and -Fast are not built in (no stored config to cite). Of its four text encoders
  the Llama (text_encoder_4) is built in, for text_encoder_4.keep_loaded and the text cache's size:
  meta-llama/Llama-3.1-8B-Instruct's config.json (hidden 4096, intermediate 14336, 32 layers, 32
  heads, 8 key/value heads, vocabulary 128256), the model HiDream-I1 ships as text_encoder_4; LoRA
  trains none of the four, so their other weights are not counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError

from .part_sizes import folder_parameters
from .wan_vae_sizes import wan_vae_encode_activation_bytes

log = logging.getLogger(__name__)

_WAN_COMMON = {"attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "freq_dim": 256,
               "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096, "rope_max_seq_len": 1024}
WAN21_1_3B = {**_WAN_COMMON, "ffn_dim": 8960, "in_channels": 16, "out_channels": 16, "num_attention_heads": 12, "num_layers": 30}
WAN21_14B = {**_WAN_COMMON, "ffn_dim": 13824, "in_channels": 16, "out_channels": 16, "num_attention_heads": 40, "num_layers": 40}
WAN22_TI2V_5B = {**_WAN_COMMON, "ffn_dim": 14336, "in_channels": 48, "out_channels": 48, "num_attention_heads": 24, "num_layers": 30}
WAN22_A14B_T2V = dict(WAN21_14B)
WAN22_A14B_I2V = {**WAN21_14B, "in_channels": 36}
UMT5_XXL = {"model_type": "umt5", "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 256384,
            "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}
_COG_COMMON = {"_class_name": "CogVideoXTransformer3DModel", "attention_head_dim": 64, "in_channels": 16,
               "out_channels": 16, "time_embed_dim": 512, "text_embed_dim": 4096, "patch_size": 2,
               "max_text_seq_length": 226, "sample_frames": 49, "sample_height": 60, "sample_width": 90}
COGVIDEOX_2B = {**_COG_COMMON, "num_layers": 30, "num_attention_heads": 30, "use_rotary_positional_embeddings": False}
COGVIDEOX_5B = {**_COG_COMMON, "num_layers": 42, "num_attention_heads": 48, "use_rotary_positional_embeddings": True}
COGVIDEOX_5B_I2V = {**COGVIDEOX_5B, "in_channels": 32, "use_learned_positional_embeddings": True}
T5_V1_1_XXL = {"model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
               "vocab_size": 32128, "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}
HUNYUAN_VIDEO = {"_class_name": "HunyuanVideoTransformer3DModel", "in_channels": 16, "out_channels": 16,
                 "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20, "num_single_layers": 40,
                 "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm",
                 "guidance_embeds": True, "text_embed_dim": 4096, "pooled_projection_dim": 768}
# AutoencoderKLHunyuanVideo()'s defaults (the release's VAE, as its transformer), with its parameter
# count: that class built on the meta device (diffusers 0.42) holds 246,478,803.
HUNYUAN_VIDEO_VAE = {"_class_name": "AutoencoderKLHunyuanVideo", "z_dim": 16, "latent_channels": 16,
                     "scale_factor_spatial": 8, "scale_factor_temporal": 4, "block_out_channels": [128, 256, 512, 512],
                     "parameters": 246_478_803}
# Its text encoders (kohya-ss/musubi-tuner at 790641960e73c396dda28ed23a12689ef2717744,
# hunyuan_model/text_encoder.py: LLAMA_CONFIG, the language model of xtuner/llava-llama-3-8b-v1_1 that
# the release ships as a LlamaModel, and CLIP_CONFIG, openai/clip-vit-large-patch14's text model).
LLAVA_LLAMA3_8B_TEXT = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128320,
                        "attention_bias": False}
# HunyuanVideo-I2V (hunyuanvideo-community/HunyuanVideo-I2V): diffusers' convert_hunyuan_video_to_diffusers.py
# (huggingface/diffusers at ff927474edad6058284371f59f04e6fe820fb6bd), TRANSFORMER_CONFIGS["HYVideo-T/2-I2V-16ch"]:
# the text-to-video transformer's sizes with image_condition_type token_replace (no extra parameters).
# Its text encoder is the whole LlavaForConditionalGeneration of xtuner/llava-llama-3-8b-v1_1: the
# language model above with its lm_head, and the vision tower of LlavaConfig's defaults (transformers
# 5.25: CLIP ViT-L/14 at 336 pixels, the 576 image tokens the pipeline's template names).
HUNYUAN_VIDEO_I2V = {"_class_name": "HunyuanVideoTransformer3DModel", "in_channels": 16, "out_channels": 16,
                     "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20, "num_single_layers": 40,
                     "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm",
                     "guidance_embeds": True, "text_embed_dim": 4096, "pooled_projection_dim": 768,
                     "image_condition_type": "token_replace"}
LLAVA_LLAMA3_8B = {"model_type": "llava", "vision_feature_layer": -2,
                   "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                     "num_attention_heads": 16, "image_size": 336, "patch_size": 14}}
CLIP_L_TEXT = {"model_type": "clip_text_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77}
LLAVA_LLAMA3_8B["text_config"] = dict(LLAVA_LLAMA3_8B_TEXT)
# How an adapter tiles its VAE's encoding when it caches latents (diffusers' enable_tiling, here
# diffusers' own defaults: 256-pixel tiles 192 apart, 16-frame chunks 12 apart), by VAE class: the
# adapter asks for exactly this and the estimate's caching figure counts one tile of it.
VAE_ENCODE_TILES: dict[str, dict[str, int]] = {
    "AutoencoderKLHunyuanVideo": {"height": 256, "width": 256, "frames": 16, "stride_height": 192, "stride_width": 192,
                                  "stride_frames": 12, "spatial": 1, "spatial_ratio": 8, "temporal_ratio": 4},
}
# VAE classes whose encoding has a formula of its own instead of the tiled one above, by class:
# (config, frames, height, width, bytes per element) -> the encoding's peak activations in bytes.
VAE_ENCODE_FORMULAS: dict[str, Callable[[dict[str, Any], int, int, int, int], int]] = {
    "AutoencoderKLWan": wan_vae_encode_activation_bytes,  # untiled, in causal chunks
}
# The tokens each text encoder reads per caption where it is not the transformer's text length (CLIP:
# 77): Hunyuan Video's Llama reads 256 caption tokens after its 95-token chat template (crop_start).
TEXT_ENCODER_TOKENS: dict[str, dict[str, int]] = {"HunyuanVideoTransformer3DModel": {"text_encoder": 256 + 95}}
# HunyuanVideo-I2V's Llava reads the 103-token I2V template with its <image> widened to 576 image tokens.
LLAVA_TOKENS = 256 + 103 - 1 + 576
HIDREAM_I1_FULL = {"_class_name": "HiDreamImageTransformer2DModel", "attention_head_dim": 128,
                   "axes_dims_rope": [64, 32, 32], "caption_channels": [4096, 4096], "max_resolution": [128, 128],
                   "in_channels": 16, "llama_layers": [*range(32), *[31] * 16], "num_attention_heads": 20,
                   "num_routed_experts": 4, "num_activated_experts": 2, "num_layers": 16, "num_single_layers": 32,
                   "out_channels": 16, "patch_size": 2, "text_emb_dim": 2048}
LLAMA_3_1_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256}
HIDREAM_VAE = {"z_dim": 16, "scale_factor_spatial": 8, "scale_factor_temporal": 1}
COGVIDEOX_VAE = {"z_dim": 16, "scale_factor_spatial": 8, "scale_factor_temporal": 4}
# Wan 2.1's VAE (also Wan 2.2 A14B's): `AutoencoderKLWan()`'s defaults, as diffusers'
# convert_wan_to_diffusers.py (at the commit above) builds it in convert_vae; Wan 2.2 TI2V-5B's: that
# script's vae22_diffusers_config. Their parameter counts: the class built from them on the meta
# device (diffusers 0.42; the decoder too, as the adapter loads the whole VAE).
WAN21_VAE = {"_class_name": "AutoencoderKLWan", "z_dim": 16, "scale_factor_spatial": 8, "scale_factor_temporal": 4,
             "base_dim": 96, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "temperal_downsample": [False, True, True],
             "parameters": 126_892_531}
WAN22_VAE = {"_class_name": "AutoencoderKLWan", "z_dim": 48, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
             "base_dim": 160, "decoder_base_dim": 256, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
             "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12, "out_channels": 12,
             "patch_size": 2, "parameters": 704_688_668}


@dataclass
class ModelConfigs:
    """What the estimator needs of a model: its transformers' configs, the text encoder's, the VAE's ratios."""

    name: str
    source: str  # where the configs came from: a folder, or "built-in (hub id)"
    transformers: list[dict[str, Any]]
    text_encoder: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=dict)
    expand_timesteps: bool = False  # Wan 2.2 TI2V-5B: one timestep per latent token
    # Every text encoder by component name (text_encoder, text_encoder_2, ...): the parts list and the
    # caching figure; empty: `text_encoder` alone.
    text_encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Parameter counts by component, from the folder's safetensors headers (core/memory/part_sizes.py).
    parameters: dict[str, int] = field(default_factory=dict)

    def encoders(self) -> dict[str, dict[str, Any]]:
        return dict(self.text_encoders) if self.text_encoders else {"text_encoder": dict(self.text_encoder)}

    def other_text_encoders(self) -> dict[str, dict[str, Any]]:
        """The text encoders after the first (text_encoder_2 ...) by settings section: those whose
        caching or keeping loaded the estimate counts beside the first (estimate.other_text_encoder_bytes)."""
        return {n: c for n, c in self.encoders().items() if n != "text_encoder"}


KNOWN_MODELS: dict[str, ModelConfigs] = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": ModelConfigs("Wan 2.1 T2V 1.3B", "", [WAN21_1_3B], UMT5_XXL, WAN21_VAE),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": ModelConfigs("Wan 2.1 T2V 14B", "", [WAN21_14B], UMT5_XXL, WAN21_VAE),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": ModelConfigs("Wan 2.2 TI2V-5B", "", [WAN22_TI2V_5B], UMT5_XXL, WAN22_VAE, True),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": ModelConfigs("Wan 2.2 T2V A14B", "", [WAN22_A14B_T2V, WAN22_A14B_T2V], UMT5_XXL, WAN21_VAE),
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": ModelConfigs("Wan 2.2 I2V A14B", "", [WAN22_A14B_I2V, WAN22_A14B_I2V], UMT5_XXL, WAN21_VAE),
    "THUDM/CogVideoX-2b": ModelConfigs("CogVideoX 2B", "", [COGVIDEOX_2B], T5_V1_1_XXL, COGVIDEOX_VAE),
    "THUDM/CogVideoX-5b": ModelConfigs("CogVideoX 5B", "", [COGVIDEOX_5B], T5_V1_1_XXL, COGVIDEOX_VAE),
    "THUDM/CogVideoX-5b-I2V": ModelConfigs("CogVideoX 5B I2V", "", [COGVIDEOX_5B_I2V], T5_V1_1_XXL, COGVIDEOX_VAE),
    "hunyuanvideo-community/HunyuanVideo": ModelConfigs("HunyuanVideo", "", [HUNYUAN_VIDEO], {}, HUNYUAN_VIDEO_VAE,
                                                         text_encoders={"text_encoder": LLAVA_LLAMA3_8B_TEXT,
                                                                        "text_encoder_2": CLIP_L_TEXT}),
    "hunyuanvideo-community/HunyuanVideo-I2V": ModelConfigs("HunyuanVideo-I2V", "", [HUNYUAN_VIDEO_I2V], {}, HUNYUAN_VIDEO_VAE,
                                                             text_encoders={"text_encoder": LLAVA_LLAMA3_8B,
                                                                            "text_encoder_2": CLIP_L_TEXT}),
    "HiDream-ai/HiDream-I1-Full": ModelConfigs("HiDream-I1 Full", "", [HIDREAM_I1_FULL], {}, HIDREAM_VAE,
                                               text_encoders={"text_encoder_4": LLAMA_3_1_8B}),
}


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); the model folder looks incomplete", key="base_model") from None


def configs_from_folder(folder: Path) -> ModelConfigs:
    """The configs of a local diffusers model folder (model_index.json, transformer/, ...)."""
    index = _read(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    transformers = [_read(folder / name / "config.json") for name in ("transformer", "transformer_2")
                    if (folder / name / "config.json").is_file()]
    if not transformers:
        raise ConfigError(f"{folder} has no transformer/config.json; point base_model at a diffusers model folder", key="base_model")
    text = folder / "text_encoder" / "config.json"
    vae = folder / "vae" / "config.json"
    # The pipeline's text encoders by component name, in model_index.json's order of their numbers.
    names = sorted((n for n in index if n.startswith("text_encoder") and (folder / n / "config.json").is_file()),
                   key=lambda n: (len(n), n))
    parameters = {n: count for n in [*names, "vae"] if (count := folder_parameters(folder / n)) is not None}
    return ModelConfigs(
        name=folder.name, source=str(folder), transformers=transformers,
        text_encoder=_read(text) if text.is_file() else dict(UMT5_XXL),
        vae=_read(vae) if vae.is_file() else {},
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        text_encoders={n: _read(folder / n / "config.json") for n in names},
        parameters=parameters,
    )


def model_configs(base_model: str) -> ModelConfigs:
    """The configs for base_model: its local folder's (or local hub cache's), else the built-in ones."""
    from core.model_folder import resolve_model_folder

    text = str(base_model).strip()
    try:
        folder = resolve_model_folder(text)
    except ConfigError:
        folder = None
    if folder is not None:
        return configs_from_folder(folder)
    for hub_id, known in KNOWN_MODELS.items():
        if hub_id.lower() == text.lower():
            return ModelConfigs(known.name, f"built-in config of {hub_id}", [dict(t) for t in known.transformers],
                                dict(known.text_encoder), dict(known.vae), known.expand_timesteps,
                                {n: dict(c) for n, c in known.text_encoders.items()})
    raise ConfigError(
        f"base_model {text} is neither a local model folder nor a model the estimator knows "
        f"({', '.join(KNOWN_MODELS)}); download it or point base_model at its folder",
        key="base_model",
    )
