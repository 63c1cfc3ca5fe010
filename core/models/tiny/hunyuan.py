"""Tiny HunyuanVideo model for diffusers.HunyuanVideoPipeline.

Kept real: 16 latent channels, the VAE's 8x spatial / 4x temporal compression, patch sizes
(2 spatial, 1 temporal), guidance embedding (HunyuanVideo is guidance-distilled), and the prompt
path: a Llama text encoder read at its third-to-last layer with the chat template cropped at 95
tokens, plus CLIP's pooled output.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ._common import save_pipeline, seed_for, vocab_size_for
from .tokenizers import (
    LLAMA3_SPECIAL_TOKENS,
    build_clip_tokenizer,
    build_llama_tokenizer,
)

logger = logging.getLogger(__name__)

LLAMA_HIDDEN = 32  # = transformer text_embed_dim
CLIP_HIDDEN = 32  # CLIPTextModel's pooler_output width = transformer pooled_projection_dim
TEMPLATE_PREFIX_TOKENS = 95  # the pipeline's default crop_start (what Llama 3 gives for the template)


def _template_prefix_length(tokenizer) -> int:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
        DEFAULT_PROMPT_TEMPLATE,
    )

    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    return len(tokenizer(prefix).input_ids)


def build_hunyuan_tokenizer():
    """A Llama tokenizer on which the chat template's system part is exactly crop_start tokens.

    The pipeline drops the first 95 positions of the text encoder's output, assuming they hold the
    template. More merges give fewer tokens, so a bisection over the merge count finds a tokenizer
    that cuts exactly the template: no prompt token is dropped and no template token is kept.
    """
    specials = LLAMA3_SPECIAL_TOKENS[2:]  # the template's <|start_header_id|>, <|end_header_id|>, <|eot_id|>
    lo, hi = 0, 600
    while lo <= hi:
        mid = (lo + hi) // 2
        tok = build_llama_tokenizer(num_merges=mid, extra_special_tokens=specials)
        n = _template_prefix_length(tok)
        if n == TEMPLATE_PREFIX_TOKENS:
            return tok
        if n > TEMPLATE_PREFIX_TOKENS:
            lo = mid + 1
        else:
            hi = mid - 1
    # No exact fit: take the most merges that still give more than 95 tokens, so that cropping
    # keeps a few template tokens rather than dropping prompt tokens.
    tok = build_llama_tokenizer(num_merges=max(hi, 0), extra_special_tokens=specials)
    logger.warning(
        "the tiny HunyuanVideo tokenizer gives %d template tokens instead of %d",
        _template_prefix_length(tok), TEMPLATE_PREFIX_TOKENS,
    )
    return tok


def build_hunyuan_video(out: Path, seed: int) -> None:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = build_hunyuan_tokenizer()
    tokenizer_2 = build_clip_tokenizer()

    seed_for(seed, "transformer")
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=10,  # = sum(rope_axes_dim)
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=LLAMA_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN,
        rope_theta=256.0,
        rope_axes_dim=(2, 4, 4),
    )

    seed_for(seed, "vae")
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),  # four levels: 8x spatial; the last two also halve time: 4x
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )

    seed_for(seed, "text_encoder")
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=vocab_size_for(tokenizer),
            hidden_size=LLAMA_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=4,  # the pipeline reads hidden_states[-3], so at least 2
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, as Llama 3
            max_position_embeddings=1024,
            rope_theta=500000.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()

    seed_for(seed, "text_encoder_2")
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size_for(tokenizer_2),
            hidden_size=CLIP_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=CLIP_HIDDEN,
            # Real ids, so the pooled output is read at the end-of-text token.
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
        )
    ).eval()

    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),  # as hunyuanvideo-community/HunyuanVideo
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    save_pipeline(pipe, out)
