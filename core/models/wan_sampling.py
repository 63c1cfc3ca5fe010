"""Sample videos from a Wan model as it is now, with the family's own pipeline (WanAdapter.sample).

It reaches the adapter only through the ModelAdapter interface, so it needs nothing of wan.py's own.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .base import ModelAdapter, SampleRequest


def sample_video(adapter: ModelAdapter, denoisers: dict[str, Any], request: SampleRequest, *,
                 device: torch.device | str, dtype: torch.dtype) -> Any:
    """See WanAdapter.sample."""
    import diffusers
    import numpy as np
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    parts = dict(denoisers)
    for name in adapter.transformer_names():
        if name not in parts:
            parts[name] = adapter.load_transformer(name, device, dtype)
    index = json.loads((adapter.folder / "model_index.json").read_text(encoding="utf-8"))
    # The folder's own scheduler class (UniPC for the Wan releases), as from_pretrained would pick.
    scheduler_type = getattr(diffusers, str(index.get("scheduler", [None, ""])[1]), None) or UniPCMultistepScheduler
    if adapter.text_parts()["text_encoder"][1] is None:
        adapter.load_text_encoder(device, dtype)
    # else: the encoder already loaded is used as it is: the run's own storage (quantized or not), and
    # during training the one that trains (fine-tuned, or carrying textual-inversion tokens).
    vae = adapter.load_vae(device, torch.float32)  # decoding in float32, as WanPipeline's examples do
    extra: dict[str, Any] = {}
    pipeline_type: Any = WanPipeline
    image = request.image
    if adapter.image_conditioned:
        if image is None:
            from core.errors import UserError

            raise UserError(f"sampling this image-to-video model ({adapter.folder}) needs an image for the first frame")
        from diffusers import WanImageToVideoPipeline
        from PIL import Image

        pipeline_type = WanImageToVideoPipeline
        extra["image"] = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    tokenizer, text_encoder = adapter.text_parts()["text_encoder"]
    pipe = pipeline_type(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
        scheduler=scheduler_type.from_pretrained(adapter.folder, subfolder="scheduler"),
        transformer=parts["transformer"], transformer_2=parts.get("transformer_2"),
        boundary_ratio=index.get("boundary_ratio"), expand_timesteps=bool(index.get("expand_timesteps", False)),
    )
    pipe.set_progress_bar_config(disable=True)
    divisor = adapter.size_divisor
    width, height = max(divisor, request.width // divisor * divisor), max(divisor, request.height // divisor * divisor)
    frames = max(1, (request.frames - 1) // adapter.temporal_ratio * adapter.temporal_ratio + 1)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    was_training = {name: module.training for name, module in parts.items()}
    try:
        for module in parts.values():
            module.eval()  # no LoRA dropout while sampling
        with torch.no_grad():
            # The captions' embeddings as training made them (encode_text follows WanPipeline's
            # own text path); it also avoids diffusers 0.42's image-to-video pipeline, whose
            # caption cleaning needs ftfy installed.
            texts = adapter.encode_text([request.prompt, request.negative_prompt])["prompt_embeds"]
            video = pipe(
                prompt_embeds=texts[:1], negative_prompt_embeds=texts[1:], width=width, height=height, num_frames=frames,
                num_inference_steps=request.steps, guidance_scale=request.guidance_scale, generator=generator, output_type="np",
                **extra,
            ).frames[0]
    finally:
        for name, module in parts.items():
            module.train(was_training[name])
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)
