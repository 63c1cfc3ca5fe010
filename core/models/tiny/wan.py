"""Tiny Wan 2.1 / Wan 2.2 (TI2V-5B and A14B) models for diffusers.WanPipeline.

The shapes that other code depends on are kept real: the VAE's latent channels (16, or 48 for
Wan 2.2's VAE), its 8x (16x for Wan 2.2) spatial and 4x temporal compression, the transformer's
patch size, and the pipeline flags (boundary_ratio, expand_timesteps). Widths and depths are tiny.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ._common import save_pipeline, seed_for, vocab_size_for
from .tokenizers import build_t5_tokenizer

logger = logging.getLogger(__name__)

# Wan 2.2 VAE (Wan2.2_VAE.pth) per-channel latent statistics, from the Wan 2.2 release.
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip

TEXT_DIM = 32  # tiny UMT5 d_model; the transformer's text_dim must match it


def _text_encoder_and_tokenizer(seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_t5_tokenizer()
    config = UMT5Config(
        vocab_size=vocab_size_for(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,  # real UMT5 values: they set the bias table shape
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    seed_for(seed, "text_encoder")
    return UMT5EncoderModel(config).eval(), tokenizer


def _transformer(seed: int, name: str, channels: int, in_channels: int | None = None):
    from diffusers import WanTransformer3DModel

    seed_for(seed, name)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits it over (t, h, w): 4 + 4 + 4
        in_channels=in_channels or channels,
        out_channels=channels,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def _vae_wan21(seed: int):
    from diffusers import AutoencoderKLWan

    seed_for(seed, "vae")
    # Four levels with temporal downsampling on the last two: 8x spatial, 4x temporal, as the real one.
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _vae_wan22(seed: int):
    from diffusers import AutoencoderKLWan

    seed_for(seed, "vae")
    # Wan 2.2's VAE: 2x2 pixel patchify (3 -> 12 channels) on top of 8x, so 16x spatial; residual blocks.
    return AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=16,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=WAN22_LATENTS_MEAN,
        latents_std=WAN22_LATENTS_STD,
    )


def _scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    # The Wan-AI *-Diffusers repos ship UniPC in flow-matching mode.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


def build_wan21(out: Path, seed: int) -> None:
    from diffusers import WanPipeline

    text_encoder, tokenizer = _text_encoder_and_tokenizer(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae_wan21(seed),
        scheduler=_scheduler(flow_shift=3.0),  # 3.0: Wan 2.1's default (480p)
        transformer=_transformer(seed, "transformer", 16),
    )
    save_pipeline(pipe, out)


def build_wan22_ti2v_5b(out: Path, seed: int) -> None:
    from diffusers import WanPipeline

    text_encoder, tokenizer = _text_encoder_and_tokenizer(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae_wan22(seed),
        scheduler=_scheduler(flow_shift=5.0),  # Wan 2.2 TI2V-5B's sample_shift
        transformer=_transformer(seed, "transformer", 48),
        expand_timesteps=True,  # TI2V-5B: per-token timesteps (the first frame can be a clean image)
    )
    save_pipeline(pipe, out)


def build_wan22_a14b(out: Path, seed: int) -> None:
    from diffusers import WanPipeline

    text_encoder, tokenizer = _text_encoder_and_tokenizer(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae_wan21(seed),  # A14B keeps Wan 2.1's 16-channel VAE
        scheduler=_scheduler(flow_shift=12.0),  # Wan 2.2 T2V-A14B's sample_shift
        transformer=_transformer(seed, "transformer", 16),  # high-noise expert
        transformer_2=_transformer(seed, "transformer_2", 16),  # low-noise expert: same shape, own weights
        boundary_ratio=0.875,
    )
    save_pipeline(pipe, out)


def build_wan22_a14b_i2v(out: Path, seed: int) -> None:
    from diffusers import WanImageToVideoPipeline

    text_encoder, tokenizer = _text_encoder_and_tokenizer(seed)
    # As Wan2.2-I2V-A14B-Diffusers: no CLIP image encoder; each expert takes the noisy latents (16)
    # beside the first-frame mask (4, one per frame of a latent frame) and the image's latents (16).
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae_wan21(seed),
        scheduler=_scheduler(flow_shift=5.0),  # Wan 2.2 I2V-A14B's sample_shift
        transformer=_transformer(seed, "transformer", 16, in_channels=36),  # high-noise expert
        transformer_2=_transformer(seed, "transformer_2", 16, in_channels=36),  # low-noise expert
        boundary_ratio=0.9,
    )
    save_pipeline(pipe, out)
