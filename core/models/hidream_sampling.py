"""Sample images from a HiDream model as it is now, with HiDreamImagePipeline (HiDreamAdapter.sample).

It reaches the adapter only through the ModelAdapter interface.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .base import ModelAdapter, SampleRequest


def sample_image(adapter: ModelAdapter, denoisers: dict[str, Any], request: SampleRequest, *,
                 device: torch.device | str, dtype: torch.dtype) -> Any:
    """See HiDreamAdapter.sample."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    transformer = denoisers.get("transformer") or adapter.load_transformer("transformer", device, dtype)
    parts = adapter.text_parts()
    for name in adapter.text_encoder_names:
        if parts[name][1] is None:
            adapter.load_text_encoder(device, dtype, name=name)
    parts = adapter.text_parts()
    vae = adapter.load_vae(device, dtype)
    # The folder's own scheduler config (its flow shift: 3.0 for HiDream-I1-Full).
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(adapter.folder, subfolder="scheduler")
    components = {}
    for name, suffix in zip(adapter.text_encoder_names, ("", "_2", "_3", "_4")):
        components[f"tokenizer{suffix}"], components[f"text_encoder{suffix}"] = parts[name]
    pipe = HiDreamImagePipeline(scheduler=scheduler, vae=vae, transformer=transformer, **components)
    pipe.set_progress_bar_config(disable=True)
    divisor = adapter.size_divisor
    width, height = max(divisor, request.width // divisor * divisor), max(divisor, request.height // divisor * divisor)
    # The pipeline rescales every request to the area (default_sample_size * vae_scale_factor)^2 and
    # rounds each side down to a multiple of vae_scale_factor * 2. An area a millionth above the asked
    # one gives back exactly the asked sides (a scale of exactly 1 could round one of them down by a step).
    pipe.default_sample_size = math.sqrt(width * height) / pipe.vae_scale_factor * (1.0 + 1e-6)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    was_training = transformer.training
    try:
        transformer.eval()  # no LoRA dropout while sampling; the inference path of the experts
        with torch.no_grad():
            # The pipeline's own text path (encode_prompt, which encode_text follows), with the negative
            # prompt where guidance_scale > 1 asks for classifier-free guidance. Called here to cast the
            # conditions to the transformer's dtype: the pipeline passes each encoder's own (its Llama
            # path ignores the dtype asked), and a quantized encoder computes in bfloat16 where the
            # transformer may run in float32.
            compute = transformer.x_embedder.proj.weight.dtype
            encoded = pipe.encode_prompt(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                                         device=device, dtype=compute,
                                         do_classifier_free_guidance=request.guidance_scale > 1)
            t5, negative_t5, llama, negative_llama, pooled, negative_pooled = (
                None if e is None else e.to(compute) for e in encoded)
            image = pipe(
                prompt_embeds_t5=t5, negative_prompt_embeds_t5=negative_t5, prompt_embeds_llama3=llama,
                negative_prompt_embeds_llama3=negative_llama, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                width=width, height=height, num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale, generator=generator, output_type="np",
            ).images
    finally:
        transformer.train(was_training)
    return (np.clip(np.asarray(image)[:1], 0.0, 1.0) * 255.0).round().astype(np.uint8)
