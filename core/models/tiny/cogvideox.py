"""Tiny CogVideoX (1.0, the 2B layout) model for diffusers.CogVideoXPipeline.

Kept real: 16 latent channels, the VAE's 8x spatial / 4x temporal compression, patch size 2 with
no temporal patching, sinusoidal 3D positional embeddings (CogVideoX-2b; the 5B uses RoPE), the
226-token text length, and the v-prediction DDIM scheduler with zero-terminal-SNR betas.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ._common import save_pipeline, seed_for, tiny_t5_encoder
from .tokenizers import build_t5_tokenizer

logger = logging.getLogger(__name__)

TEXT_DIM = 32  # tiny T5 d_model = transformer text_embed_dim
MAX_TEXT_SEQ_LENGTH = 226  # the pipeline's default max_sequence_length; the transformer's text positions


def build_cogvideox(out: Path, seed: int) -> None:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tokenizer = build_t5_tokenizer(model_max_length=MAX_TEXT_SEQ_LENGTH)

    text_encoder = tiny_t5_encoder(seed, "text_encoder", tokenizer, d_model=TEXT_DIM)

    seed_for(seed, "transformer")
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # heads x dim must be divisible by 16 for the 3D sin-cos embedding
        in_channels=16,
        out_channels=16,
        time_embed_dim=16,
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

    seed_for(seed, "vae")
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),  # four levels: 8x spatial; the first two also halve time: 4x
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        scaling_factor=1.15258426,
    )

    # CogVideoX-2b's scheduler_config.json.
    scheduler = CogVideoXDDIMScheduler(
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
        snr_shift_scale=3.0,
    )

    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    save_pipeline(pipe, out)
