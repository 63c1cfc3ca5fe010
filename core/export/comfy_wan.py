"""Wan LoRA keys in ComfyUI's native format, converted from diffusers/peft names.

ComfyUI runs Wan with the module names of the original Wan code (``blocks.0.self_attn.q``), not
diffusers' (``blocks.0.attn1.to_q``). Its LoRA loader takes, for each model weight
``diffusion_model.X.weight``, the keys ``diffusion_model.X.lora_A.weight`` (down, rank x in),
``diffusion_model.X.lora_B.weight`` (up, out x rank) and an optional scalar
``diffusion_model.X.alpha``; the update is ``alpha / rank * B @ A`` (scale 1 without an alpha key),
and ``diffusion_model.X.diff_b`` is added to the bias as it is.

The table below is the inverse of the renaming in diffusers' scripts/convert_wan_to_diffusers.py
and of diffusers' loader for such files, ``_convert_non_diffusers_wan_lora_to_diffusers``
(diffusers/loaders/lora_conversion_utils.py), which ``WanPipeline.load_lora_weights`` applies to
any file whose keys start with ``diffusion_model.``. That loader reads ``.alpha`` only for the
per-block modules; for the modules outside the blocks it ignores alpha (an ``.alpha`` key there
makes it fail), so for those the alpha/rank scale is multiplied into lora_B and no alpha is
written, which both loaders read as scale 1: the same update.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .lora_modules import lora_modules

if TYPE_CHECKING:
    import torch

COMFY_PREFIX = "diffusion_model."

# Inside blocks.{i}: diffusers module -> original Wan module. These carry an .alpha key.
BLOCK_MODULES: dict[str, str] = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",  # image-conditioned models (Wan 2.1 I2V) only
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}

# Outside the blocks: diffusers module -> original Wan module. Scale baked into lora_B, no .alpha.
GLOBAL_MODULES: dict[str, str] = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",  # I2V only
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}

_BLOCK_MODULE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def wan_module_name(module: str) -> tuple[str, bool]:
    """(original Wan name, whether it takes an .alpha key) of a diffusers module name.

    Raises ValueError for a module with no place in the original layout (norms, the Conv3d patch
    embedding, anything not in the tables above).
    """
    match = _BLOCK_MODULE.match(module)
    if match and match.group(2) in BLOCK_MODULES:
        return f"blocks.{match.group(1)}.{BLOCK_MODULES[match.group(2)]}", True
    if module in GLOBAL_MODULES:
        return GLOBAL_MODULES[module], False
    raise ValueError(f"{module} has no name in ComfyUI's Wan LoRA format")



def diffusers_to_comfy(state_dict: Mapping[str, torch.Tensor], scales: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """ComfyUI-format tensors for a peft LoRA state dict.

    state_dict: peft keys (``blocks.0.attn1.to_q.lora_A.weight``, optionally ``transformer.``-
    prefixed). scales: module name -> the LoRA's forward scale there (lora_alpha / r, or
    lora_alpha / sqrt(r) with rsLoRA). Block modules get ``.alpha = scale * rank`` (so that
    ComfyUI's alpha / rank gives the same scale, also with rsLoRA); the others get the scale
    multiplied into lora_B. Alpha tensors are float32 scalars; the rest keep their dtype.
    Raises ValueError for a module that cannot be named in the format.
    """
    import torch

    modules = lora_modules(state_dict)

    out: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        wan, has_alpha = wan_module_name(module)
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            raise ValueError(f"{module} has only one of lora_A / lora_B")
        down, up = parts[".lora_A.weight"], parts[".lora_B.weight"]
        if down.ndim != 2 or up.ndim != 2:
            raise ValueError(f"{module} is not a linear layer; ComfyUI's Wan format holds linear LoRAs only")
        scale = float(scales[module])
        name = COMFY_PREFIX + wan
        out[f"{name}.lora_A.weight"] = down
        if has_alpha:
            out[f"{name}.lora_B.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
        else:
            out[f"{name}.lora_B.weight"] = (up.float() * scale).to(up.dtype)
        if ".lora_B.bias" in parts:  # peft's lora_bias: scaled like the rest of lora_B's output
            bias = parts[".lora_B.bias"]
            out[f"{name}.diff_b"] = (bias.float() * scale).to(bias.dtype)
    return out


__all__ = ["BLOCK_MODULES", "COMFY_PREFIX", "GLOBAL_MODULES", "diffusers_to_comfy", "wan_module_name"]
