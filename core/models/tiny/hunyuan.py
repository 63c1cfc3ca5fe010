"""Tiny HunyuanVideo models for diffusers.HunyuanVideoPipeline and HunyuanVideoImageToVideoPipeline.

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


def _transformer(seed: int, **layout):
    from diffusers import HunyuanVideoTransformer3DModel

    seed_for(seed, "transformer")
    config = dict(
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
    return HunyuanVideoTransformer3DModel(**{**config, **layout})


def _vae(seed: int):
    from diffusers import AutoencoderKLHunyuanVideo

    seed_for(seed, "vae")
    return AutoencoderKLHunyuanVideo(
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


def _clip(seed: int, tokenizer_2):
    from transformers import CLIPTextConfig, CLIPTextModel

    seed_for(seed, "text_encoder_2")
    return CLIPTextModel(
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


def build_hunyuan_video(out: Path, seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    tokenizer = build_hunyuan_tokenizer()
    tokenizer_2 = build_clip_tokenizer()

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

    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_transformer(seed),
        vae=_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),  # as hunyuanvideo-community/HunyuanVideo
        text_encoder_2=_clip(seed, tokenizer_2),
        tokenizer_2=tokenizer_2,
    )
    save_pipeline(pipe, out)


# HunyuanVideo-I2V: the Llava text encoder reads the image as 576 tokens (CLIP ViT-L/14 at 336 pixels:
# 24 x 24 patches) at the template's <image>, position image_emb_start = 5; its chat markers are
# one token each, as in Llama 3's tokenizer, which the pipeline's cropping counts on.
I2V_TEMPLATE_PREFIX_TOKENS = 103  # the I2V template's crop_start
I2V_WORDS = ("<image>", "system", "user", "assistant", "\n\n")
VISION_HIDDEN = 16


def _i2v_prefix_length(tokenizer) -> int:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    return len(tokenizer(DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]).input_ids)


def build_hunyuan_i2v_tokenizer():
    """A Llama tokenizer on which the I2V template's part before the caption is exactly crop_start
    (103) tokens with <image> the sixth, found by bisection over the merge count as for text-to-video."""
    specials = LLAMA3_SPECIAL_TOKENS[2:] + I2V_WORDS
    lo, hi = 0, 600
    while lo <= hi:
        mid = (lo + hi) // 2
        tok = build_llama_tokenizer(num_merges=mid, extra_special_tokens=specials)
        n = _i2v_prefix_length(tok)
        if n == I2V_TEMPLATE_PREFIX_TOKENS:
            return tok
        if n > I2V_TEMPLATE_PREFIX_TOKENS:
            lo = mid + 1
        else:
            hi = mid - 1
    tok = build_llama_tokenizer(num_merges=max(hi, 0), extra_special_tokens=specials)
    logger.warning("the tiny HunyuanVideo-I2V tokenizer gives %d template tokens instead of %d",
                   _i2v_prefix_length(tok), I2V_TEMPLATE_PREFIX_TOKENS)
    return tok


def _llava(seed: int, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    seed_for(seed, "text_encoder")
    text = LlamaConfig(
        vocab_size=vocab_size_for(tokenizer), hidden_size=LLAMA_HIDDEN, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=VISION_HIDDEN, hidden_act="quick_gelu")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)
    # The pipeline pads the expanded prompt with config.pad_token_id, as xtuner/llava-llama-3-8b's config has one.
    config.pad_token_id = tokenizer.pad_token_id
    return LlavaForConditionalGeneration(config).eval()


def build_hunyuan_video_i2v(out: Path, seed: int) -> None:
    """HunyuanVideo-I2V (hunyuanvideo-community/HunyuanVideo-I2V): token_replace image conditioning
    (16 input channels; the first latent frame is the image's, at timestep 0), guidance-distilled,
    a LlavaForConditionalGeneration text encoder with its CLIPImageProcessor."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline
    from transformers import CLIPImageProcessor

    tokenizer = build_hunyuan_i2v_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=_llava(seed, tokenizer), tokenizer=tokenizer,
        transformer=_transformer(seed, image_condition_type="token_replace"), vae=_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=_clip(seed, tokenizer_2), tokenizer_2=tokenizer_2,
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    )
    save_pipeline(pipe, out)
