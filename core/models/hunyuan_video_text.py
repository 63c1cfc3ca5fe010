"""Hunyuan Video's text conditions, as its pipelines' encode_prompt makes them (HunyuanVideoAdapter.encode_text).

Text, as HunyuanVideoPipeline.encode_prompt:
- Llama (text_encoder): the caption inside the pipeline's DEFAULT_PROMPT_TEMPLATE, tokenized to
  256 + crop_start tokens (padding, truncation, with its attention mask), the hidden state
  `hidden_states[-(num_hidden_layers_to_skip + 1)]` (the pipeline skips 2: the third-to-last), and
  the first crop_start (95) positions, the template's system part, cut away from the embeddings and
  the mask. What is kept: prompt_embeds (256, D) and prompt_attention_mask (256,).
  The transformer reads only the masked tokens (its token refiner pools and attends under the mask,
  and the joint attention masks every text position past the caption's length), so the padded
  positions are zeroed here, so the cache stores only the caption's tokens; the collate pads
  embeddings and mask back to the 256 together.
- CLIP-L (text_encoder_2): the caption (the pipeline passes `prompt`, not prompt_2, to CLIP) padded
  to 77 tokens, encoded without a mask, its pooler_output: pooled_projections (D,).

Image-to-video: the Llava's reading of the caption with the clip's first frame instead of the Llama's
(hunyuan_video_i2v.llava_prompt_embeds, the pipeline's own code), zeroed and pooled the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# _get_llama_prompt_embeds' num_hidden_layers_to_skip and _get_clip_prompt_embeds' max_sequence_length.
HIDDEN_LAYERS_SKIPPED = 2
CLIP_LENGTH = 77


def crop_start(template: dict[str, Any], tokenizer: Any) -> int:
    """The template's crop_start, or where it has none the pipeline's count: the template's tokens
    padded to the tokenizer's length, less the <|eot_id|> and the placeholder."""
    value = template.get("crop_start")
    if value is None:
        value = tokenizer(template["template"], padding="max_length", return_tensors="pt",
                          return_attention_mask=False)["input_ids"].shape[-1] - 2
    return int(value)


def _finish(embeds: torch.Tensor, mask: torch.Tensor, parts: dict[str, tuple[Any, Any]], captions: list[str]) -> dict[str, torch.Tensor]:
    """The conditions: embeds zeroed past the mask, the bool mask, CLIP's pooled vector."""
    import torch

    keep = mask.bool()
    embeds = torch.where(keep[:, :, None], embeds, torch.zeros((), dtype=embeds.dtype, device=embeds.device))
    clip_tokenizer, clip = parts["text_encoder_2"]
    inputs = clip_tokenizer(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt")
    pooled = clip(inputs.input_ids.to(next(clip.parameters()).device), output_hidden_states=False).pooler_output
    return {"prompt_embeds": embeds, "prompt_attention_mask": keep, "pooled_projections": pooled.to(embeds.device)}


def llama_conditions(parts: dict[str, tuple[Any, Any]], captions: list[str], template: dict[str, Any], max_length: int,
                     grad: bool) -> dict[str, torch.Tensor]:
    """HunyuanVideoPipeline.encode_prompt's conditions; grad: with autograd (textual inversion)."""
    import torch

    tokenizer, llama = parts["text_encoder"]
    start = crop_start(template, tokenizer)
    inputs = tokenizer(
        [template["template"].format(c) for c in captions], max_length=max_length + start,
        padding="max_length", truncation=True, return_tensors="pt", return_length=False,
        return_overflowing_tokens=False, return_attention_mask=True,
    )
    device = next(llama.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    with torch.enable_grad() if grad else torch.no_grad():
        hidden = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        embeds = hidden[-(HIDDEN_LAYERS_SKIPPED + 1)]
        if start > 0:
            embeds, mask = embeds[:, start:], mask[:, start:]
        return _finish(embeds, mask, parts, captions)


def llava_conditions(parts: dict[str, tuple[Any, Any]], image_processor: Any, captions: list[str], images: list[Any],
                     template: dict[str, Any], max_length: int, interleave: int, grad: bool) -> dict[str, torch.Tensor]:
    """HunyuanVideoImageToVideoPipeline.encode_prompt's conditions, each caption read with its image
    (a PIL image or (H, W, 3) uint8)."""
    import numpy as np
    import torch
    from PIL import Image

    from .hunyuan_video_i2v import llava_prompt_embeds

    pictures = [i if isinstance(i, Image.Image) else Image.fromarray(np.asarray(i, dtype=np.uint8)) for i in images]
    tokenizer, llava = parts["text_encoder"]
    with torch.enable_grad() if grad else torch.no_grad():
        embeds, mask = llava_prompt_embeds(tokenizer, llava, image_processor, captions, pictures, template, max_length, interleave)
        return _finish(embeds, mask, parts, captions)
