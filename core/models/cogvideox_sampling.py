"""Sample videos from a CogVideoX model as it is now, with CogVideoXPipeline (CogVideoXAdapter.sample).

It reaches the adapter only through the ModelAdapter interface.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .base import ModelAdapter, SampleRequest


def sample_video(adapter: ModelAdapter, denoisers: dict[str, Any], request: SampleRequest, *,
                 device: torch.device | str, dtype: torch.dtype) -> Any:
    """See CogVideoXAdapter.sample."""
    import diffusers
    import numpy as np
    import torch
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline, CogVideoXPipeline

    transformer = denoisers.get("transformer") or adapter.load_transformer("transformer", device, dtype)
    index = json.loads((adapter.folder / "model_index.json").read_text(encoding="utf-8"))
    # The folder's own scheduler class (CogVideoXDDIMScheduler for the releases).
    scheduler_type = getattr(diffusers, str(index.get("scheduler", [None, ""])[1]), None) or CogVideoXDDIMScheduler
    if adapter.text_parts()["text_encoder"][1] is None:
        adapter.load_text_encoder(device, dtype)
    # The pipeline decodes latents in the prompt embeddings' dtype without casting them to the VAE's,
    # so the VAE computes in the same dtype as the embeddings.
    vae = adapter.load_vae(device, dtype)
    tokenizer, text_encoder = adapter.text_parts()["text_encoder"]
    pipeline_type = CogVideoXImageToVideoPipeline if adapter.image_conditioned else CogVideoXPipeline
    pipe = pipeline_type(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=scheduler_type.from_pretrained(adapter.folder, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    divisor = adapter.size_divisor
    width, height = max(divisor, request.width // divisor * divisor), max(divisor, request.height // divisor * divisor)
    if adapter.fixed_size is not None:
        height, width = adapter.fixed_size
    extra: dict[str, Any] = {}
    if adapter.image_conditioned:
        if request.image is None:
            raise ValueError(f"{adapter.family} needs request.image, the first frame to start from")
        from PIL import Image

        image = request.image
        extra["image"] = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    frames = adapter.frame_rule.round_down(request.frames) or adapter.frame_rule.first
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    was_training = transformer.training
    try:
        transformer.eval()  # no LoRA dropout while sampling
        with torch.no_grad():
            # The captions' embeddings as training made them (encode_text is the pipeline's own text path).
            texts = adapter.encode_text([request.prompt, request.negative_prompt])["prompt_embeds"].to(device, dtype)
            video = pipe(
                prompt_embeds=texts[:1], negative_prompt_embeds=texts[1:], width=width, height=height, num_frames=frames,
                num_inference_steps=request.steps, guidance_scale=request.guidance_scale, generator=generator,
                output_type="np", **extra,
            ).frames[0]
    finally:
        transformer.train(was_training)
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)
