"""Sample videos from a Hunyuan Video model as it is now, with HunyuanVideoPipeline or, for
image-to-video, HunyuanVideoImageToVideoPipeline (HunyuanVideoAdapter.sample).

It reaches the adapter through the ModelAdapter interface, and for image-to-video its
image_processor (the I2V folder's CLIPImageProcessor, which the pipeline takes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .base import ModelAdapter, SampleRequest


def sample_video(adapter: ModelAdapter, denoisers: dict[str, Any], request: SampleRequest, *,
                 device: torch.device | str, dtype: torch.dtype) -> Any:
    """See HunyuanVideoAdapter.sample."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline, HunyuanVideoPipeline
    from PIL import Image

    transformer = denoisers.get("transformer") or adapter.load_transformer("transformer", device, dtype)
    parts = adapter.text_parts()
    for name in adapter.text_encoder_names:
        if parts[name][1] is None:
            adapter.load_text_encoder(device, dtype, name=name)
    parts = adapter.text_parts()
    vae = adapter.load_vae(device, dtype)
    (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) = parts["text_encoder"], parts["text_encoder_2"]
    # The folder's own scheduler config: its flow shift (7.0 for hunyuanvideo-community/HunyuanVideo).
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(adapter.folder, subfolder="scheduler")
    components = dict(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                      scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    extra: dict[str, Any] = {}
    if adapter.image_conditioned:
        if request.image is None:
            raise ValueError(f"{adapter.family} needs request.image, the first frame to start from")
        image = request.image
        extra["image"] = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        pipe = HunyuanVideoImageToVideoPipeline(**components, image_processor=adapter.image_processor)  # type: ignore[attr-defined]
    else:
        pipe = HunyuanVideoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    divisor = adapter.size_divisor
    width, height = max(divisor, request.width // divisor * divisor), max(divisor, request.height // divisor * divisor)
    frames = adapter.frame_rule.round_down(request.frames) or adapter.frame_rule.first
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    was_training = transformer.training
    try:
        transformer.eval()  # no LoRA dropout while sampling
        with torch.no_grad():
            # The caption's conditions as training made them (encode_text is the pipeline's own text path).
            # No negative prompt: the pipeline uses one only for true_cfg_scale > 1, and guidance_scale is
            # the distilled guidance the transformer embeds.
            text = (adapter.encode_text([request.prompt], images=[extra["image"]]) if extra
                    else adapter.encode_text([request.prompt]))
            video = pipe(
                prompt_embeds=text["prompt_embeds"].to(device, dtype),
                prompt_attention_mask=text["prompt_attention_mask"].to(device),
                pooled_prompt_embeds=text["pooled_projections"].to(device, dtype),
                width=width, height=height, num_frames=frames, num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale, generator=generator, output_type="np", **extra,
            ).frames[0]
    finally:
        transformer.train(was_training)
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)
