"""Tiny CogVideoX models for diffusers' CogVideoXPipeline and CogVideoXImageToVideoPipeline.

Four layouts, each following its release's configs:

- ``cogvideox``: CogVideoX-2b (sinusoidal 3D positional embeddings, snr_shift_scale 3).
- ``cogvideox_i2v``: CogVideoX-5b-I2V (rotary embeddings plus learned positional embeddings, which
  fix the frame size; 32 input channels: the noisy latents, then the image latents).
- ``cogvideox15``: CogVideoX1.5-5B (rotary embeddings, time patched by 2, no patch bias, a VAE with
  invert_scale_latents).
- ``cogvideox15_i2v``: CogVideoX1.5-5B-I2V (as 1.5, with 32 input channels and the ofs embedding).

Kept real in all: 16 latent channels, the VAE's 8x spatial / 4x temporal compression, patch size 2,
the 226-token text length, and the v-prediction DDIM scheduler with zero-terminal-SNR betas.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ._common import save_pipeline, seed_for, tiny_t5_encoder
from .tokenizers import build_t5_tokenizer

logger = logging.getLogger(__name__)

TEXT_DIM = 32  # tiny T5 d_model = transformer text_embed_dim
MAX_TEXT_SEQ_LENGTH = 226  # the pipeline's default max_sequence_length; the transformer's text positions
TIME_EMBED_DIM = 16
# The 5b-I2V's learned positional embeddings fix its frame size: 8 latent cells, 64 pixels (the real
# one's 60x90 cells, 480x720 pixels). 1.5 keeps the release's 300 cells, which only bound its rotary tables.
SAMPLE_CELLS = 8
SAMPLE_CELLS_1_5 = 300


def _transformer(seed: int, **layout: Any) -> Any:
    from diffusers import CogVideoXTransformer3DModel

    seed_for(seed, "transformer")
    config: dict[str, Any] = dict(
        num_attention_heads=2,
        attention_head_dim=16,  # heads x dim must be divisible by 16 for the 3D sin-cos embedding
        in_channels=16,
        out_channels=16,
        time_embed_dim=TIME_EMBED_DIM,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        # The size the positional embedding is precomputed for (latent units); other sizes are computed on the fly.
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=MAX_TEXT_SEQ_LENGTH,
        use_rotary_positional_embeddings=False,
        use_learned_positional_embeddings=False,
    )
    config.update(layout)
    return CogVideoXTransformer3DModel(**config)


def _vae(seed: int, invert_scale_latents: bool = False) -> Any:
    from diffusers import AutoencoderKLCogVideoX

    seed_for(seed, "vae")
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),  # four levels: 8x spatial; the first two also halve time: 4x
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        scaling_factor=1.15258426 if not invert_scale_latents else 0.7,
        invert_scale_latents=invert_scale_latents,
    )


def _scheduler(snr_shift_scale: float) -> Any:
    """The releases' scheduler_config.json: 3.0 for the 2b, 1.0 for the 5b, 5b-I2V and 1.5 models."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=snr_shift_scale,
    )


def _save(out: Path, seed: int, pipeline: str, transformer: Any, vae: Any, snr_shift_scale: float) -> None:
    import diffusers

    tokenizer = build_t5_tokenizer(model_max_length=MAX_TEXT_SEQ_LENGTH)
    text_encoder = tiny_t5_encoder(seed, "text_encoder", tokenizer, d_model=TEXT_DIM)
    pipe = getattr(diffusers, pipeline)(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                        transformer=transformer, scheduler=_scheduler(snr_shift_scale))
    save_pipeline(pipe, out)


def build_cogvideox(out: Path, seed: int) -> None:
    _save(out, seed, "CogVideoXPipeline", _transformer(seed), _vae(seed), snr_shift_scale=3.0)


def build_cogvideox_i2v(out: Path, seed: int) -> None:
    # Learned positional embeddings need rotary ones too (diffusers refuses them alone), and take
    # only frames of sample_height x sample_width latent cells, as the 5b-I2V takes only 480x720.
    transformer = _transformer(seed, in_channels=32, use_rotary_positional_embeddings=True,
                               use_learned_positional_embeddings=True, sample_height=SAMPLE_CELLS, sample_width=SAMPLE_CELLS)
    _save(out, seed, "CogVideoXImageToVideoPipeline", transformer, _vae(seed), snr_shift_scale=1.0)


def _transformer_1_5(seed: int, **layout: Any) -> Any:
    return _transformer(seed, use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False,
                        sample_frames=81, sample_height=SAMPLE_CELLS_1_5, sample_width=SAMPLE_CELLS_1_5, **layout)


def build_cogvideox15(out: Path, seed: int) -> None:
    _save(out, seed, "CogVideoXPipeline", _transformer_1_5(seed), _vae(seed, invert_scale_latents=True),
          snr_shift_scale=1.0)


def build_cogvideox15_i2v(out: Path, seed: int) -> None:
    # The ofs embedding adds to the time embedding, so it has the time embedding's width.
    transformer = _transformer_1_5(seed, in_channels=32, ofs_embed_dim=TIME_EMBED_DIM)
    _save(out, seed, "CogVideoXImageToVideoPipeline", transformer, _vae(seed, invert_scale_latents=True),
          snr_shift_scale=1.0)
