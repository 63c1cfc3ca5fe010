"""HiDream LoRA keys in ComfyUI's native format, converted from diffusers/peft names.

ComfyUI's HiDream model (comfy/ldm/hidream/model.py) is a port of the original HiDream-I1 code,
which diffusers' HiDreamImageTransformer2DModel follows module for module: the same names
(``double_stream_blocks.0.block.attn1.to_q``, ``caption_projection.3.linear``, ``final_layer.linear``).
ComfyUI's LoRA key map reads, for each model weight ``diffusion_model.X.weight``, the keys
``diffusion_model.X.lora_A.weight`` (rank x in) and ``diffusion_model.X.lora_B.weight`` (out x rank),
the update ``B @ A`` (times alpha / rank where an ``.alpha`` key is given).

diffusers reads such a file back with ``_convert_non_diffusers_hidream_lora_to_diffusers``
(diffusers/loaders/lora_conversion_utils.py), which ``HiDreamImagePipeline.load_lora_weights``
applies to any file with a ``diffusion_model`` key: it requires every key to start with
``diffusion_model.``, strips that prefix and adds ``transformer.``, nothing else. So the inverse is
the prefix, and what that converter leaves out dictates the rest:

- No ``.alpha`` keys: the converter passes them on as ``transformer.X.alpha``, which peft does not
  read, and without one both ComfyUI and diffusers use scale 1. So each module's alpha / rank scale
  (or rsLoRA's alpha / sqrt(rank)) is multiplied into its lora_B.
- No LoRA bias (peft's lora_bias): ComfyUI adds a bias only from a ``.diff_b`` key, which the
  converter would hand to peft under a name it does not know. Refused, as are non-linear layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .lora_modules import lora_modules

if TYPE_CHECKING:
    import torch

COMFY_PREFIX = "diffusion_model."



def diffusers_to_comfy(state_dict: Mapping[str, torch.Tensor], scales: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """ComfyUI-format tensors for a peft LoRA state dict of a HiDreamImageTransformer2DModel.

    state_dict: peft keys (``double_stream_blocks.0.block.attn1.to_q.lora_A.weight``, optionally
    ``transformer.``-prefixed). scales: module name -> the LoRA's forward scale there, multiplied
    into lora_B (in at least float32, back in lora_B's dtype). Raises ValueError for a module the
    format cannot hold (module docstring).
    """
    import torch

    modules = lora_modules(state_dict)

    out: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        if ".lora_B.bias" in parts:
            raise ValueError(f"{module} has a LoRA bias (lora.bias), which diffusers' HiDream converter does not read")
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            raise ValueError(f"{module} has only one of lora_A / lora_B")
        down, up = parts[".lora_A.weight"], parts[".lora_B.weight"]
        if down.ndim != 2 or up.ndim != 2:
            raise ValueError(f"{module} is not a linear layer; ComfyUI's HiDream format holds linear LoRAs only")
        name = COMFY_PREFIX + module
        out[f"{name}.lora_A.weight"] = down
        wide = torch.promote_types(up.dtype, torch.float32)
        out[f"{name}.lora_B.weight"] = (up.to(wide) * float(scales[module])).to(up.dtype)
    return out


__all__ = ["COMFY_PREFIX", "diffusers_to_comfy"]
