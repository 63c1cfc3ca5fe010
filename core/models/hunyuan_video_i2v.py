"""What HunyuanVideo-I2V adds to the Hunyuan Video adapter, as HunyuanVideoImageToVideoPipeline does it.

Text: the Llava text encoder (LlavaForConditionalGeneration) reads the clip's first frame with the
caption: the pipeline's own `_get_llama_prompt_embeds` runs here on the adapter's parts (the I2V
prompt template with its <image> token widened to 576 image tokens, the hidden state
`hidden_states[-3]`, the template cropped away), so the prompt embeddings are the image's tokens,
every `image_embed_interleave`-th (2 for latent_concat, 4 for token_replace: the pipeline's
defaults), then the caption's. The embeddings therefore depend on the frame as well as the caption:
the text cache keeps one entry per clip variant (ModelAdapter.text_takes_image).

Image conditioning, by the transformer's `image_condition_type` (prepare_latents and __call__):
- token_replace (hunyuanvideo-community/HunyuanVideo-I2V, 16 input channels): the first latent frame
  is the image's latents (the VAE's mode times scaling_factor), clean; the transformer modulates its
  tokens as at timestep 0, and the scheduler steps only the later frames. Training therefore learns
  the frames after the first (split_latents drops the clip's own first latent frame) with the
  image's latents put in front of the noisy ones.
- latent_concat (HunyuanVideo-I2V-33ch, 33 input channels): the noisy latents, then the image
  latents in the first frame and zeros after, then a mask channel (1 on the first frame), on the
  channel axis; every frame is learned.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

I2V_PIPELINE = "HunyuanVideoImageToVideoPipeline"
CONDITION_TYPES = ("token_replace", "latent_concat")


def image_embed_interleave(condition_type: str) -> int:
    """HunyuanVideoImageToVideoPipeline.__call__'s default for the transformer's condition type."""
    return {"latent_concat": 2, "token_replace": 4}.get(condition_type, 1)


def llava_prompt_embeds(tokenizer: Any, encoder: Any, image_processor: Any, captions: list[str], images: list[Any],
                        template: dict[str, Any], max_length: int, interleave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (B, L, D), mask (B, L)) from the pipeline's own _get_llama_prompt_embeds."""
    from diffusers import HunyuanVideoImageToVideoPipeline

    device = next(encoder.parameters()).device
    dtype = next(p for p in encoder.parameters() if p.is_floating_point()).dtype
    owner = SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder, image_processor=image_processor, _execution_device=device)
    return HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds(
        owner, images, captions, template, device=device, dtype=dtype, max_sequence_length=max_length,
        image_embed_interleave=interleave)


def first_frames(frames: torch.Tensor) -> list[Any]:
    """(B, 3, F, H, W) in [-1, 1] -> each clip's first frame as a PIL image, what the pipeline's
    image processor is given."""
    import numpy as np
    import torch
    from PIL import Image

    pixels = ((frames[:, :, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).cpu().numpy())) for p in pixels]


def model_input(condition_type: str, noisy: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """The transformer's hidden_states from the noisy latents and the (B, C, 1, h, w) image latents,
    as the pipeline's denoising loop builds latent_model_input."""
    import torch

    if condition_type == "token_replace":
        return torch.cat([condition.to(noisy.dtype), noisy], dim=2)
    image = torch.cat([condition, condition.new_zeros(*condition.shape[:2], noisy.shape[2] - 1, *condition.shape[3:])], dim=2)
    mask = torch.zeros_like(image[:, :1])
    mask[:, :, :1] = 1
    return torch.cat([noisy, image.to(noisy.dtype), mask.to(noisy.dtype)], dim=1)
