"""Tiny HiDream-I1 model for diffusers.HiDreamImagePipeline (an image model).

Kept real: the Flux-style VAE's 16 latent channels and 8x compression, patch size 2, the four
text encoders and their roles (two CLIPs with projection for the pooled vector, T5 and Llama 3
for the sequence, the transformer reading chosen Llama layers, one per block), long-CLIP's 248
positions, and mixture-of-experts feed-forwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ._common import save_pipeline, seed_for, tiny_t5_encoder, vocab_size_for
from .tokenizers import build_clip_tokenizer, build_llama3_tokenizer, build_t5_tokenizer

logger = logging.getLogger(__name__)

CLIP_L_PROJECTION = 16
CLIP_G_PROJECTION = 24  # the pooled vector is both projections concatenated (768 + 1280 in the real model)
T5_DIM = 32
LLAMA_DIM = 48
LLAMA_LAYERS = 4
NUM_DOUBLE_BLOCKS = 1
NUM_SINGLE_BLOCKS = 2
CLIP_POSITIONS = 248  # HiDream's CLIPs are long-CLIP; the pipeline pads their prompts to 128 tokens


def _clip(seed: int, name: str, tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    seed_for(seed, name)
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size_for(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_POSITIONS,
            hidden_act="quick_gelu",
            projection_dim=projection,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def build_hidream(out: Path, seed: int) -> None:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_clip_tokenizer(model_max_length=CLIP_POSITIONS)
    tokenizer_2 = build_clip_tokenizer(model_max_length=CLIP_POSITIONS)
    tokenizer_3 = build_t5_tokenizer()
    tokenizer_4 = build_llama3_tokenizer()

    text_encoder = _clip(seed, "text_encoder", tokenizer, hidden=32, projection=CLIP_L_PROJECTION)
    text_encoder_2 = _clip(seed, "text_encoder_2", tokenizer_2, hidden=48, projection=CLIP_G_PROJECTION)

    text_encoder_3 = tiny_t5_encoder(seed, "text_encoder_3", tokenizer_3, d_model=T5_DIM)

    seed_for(seed, "text_encoder_4")
    text_encoder_4 = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size_for(tokenizer_4),
            hidden_size=LLAMA_DIM,
            intermediate_size=96,
            num_hidden_layers=LLAMA_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_theta=500000.0,
            bos_token_id=tokenizer_4.bos_token_id,
            eos_token_id=tokenizer_4.eos_token_id,
            pad_token_id=tokenizer_4.eos_token_id,  # the pipeline pads Llama prompts with eos
            tie_word_embeddings=False,
        )
    ).eval()

    seed_for(seed, "transformer")
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=NUM_DOUBLE_BLOCKS,
        num_single_layers=NUM_SINGLE_BLOCKS,
        attention_head_dim=8,  # = sum(axes_dims_rope)
        num_attention_heads=4,
        caption_channels=[T5_DIM, LLAMA_DIM],
        text_emb_dim=CLIP_L_PROJECTION + CLIP_G_PROJECTION,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(128, 128),
        # One Llama hidden state per block (double then single); index i is the output of layer i + 1.
        llama_layers=list(range(NUM_DOUBLE_BLOCKS + NUM_SINGLE_BLOCKS)),
    )

    seed_for(seed, "vae")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # four levels: 8x spatial, as Flux's VAE
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )

    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
    save_pipeline(pipe, out)
