"""Hunyuan Video LoRA keys in ComfyUI's native format, converted from diffusers/peft names.

ComfyUI runs Hunyuan Video with the module names of the original HunyuanVideo code
(``double_blocks.0.img_attn_qkv``), not diffusers' (``transformer_blocks.0.attn.to_q``), and its
LoRA loader takes, for a model weight ``diffusion_model.X.weight`` of shape (out, in), the keys
``diffusion_model.X.lora_A.weight`` (rank x in) and ``diffusion_model.X.lora_B.weight``
(out x rank), the update ``B @ A`` (times alpha / rank where an ``.alpha`` key is given).

The table below is the inverse of diffusers' loader for such files,
``_convert_hunyuan_video_lora_to_diffusers`` (diffusers/loaders/lora_conversion_utils.py), which
``HunyuanVideoPipeline.load_lora_weights`` applies to any file with an ``img_attn_qkv`` key. What
that converter dictates:

- Fused layers. The original code computes q, k and v of each stream with one Linear
  (``img_attn_qkv``, ``txt_attn_qkv``) and, in the single-stream blocks, q, k, v and the MLP's
  input with one (``linear1``). The converter gives each diffusers projection the file's whole
  lora_A and its own rows of lora_B (split in equal thirds for qkv; at 3072, 3072, 3072 and the
  rest for linear1, the released model's hidden size, which it hard-codes). So the fused lora_A
  here is the members' lora_A stacked on the rank axis and lora_B block-diagonal: member i's rows
  hold its own lora_B in its own rank columns and zeros elsewhere. Both loaders then compute
  exactly each member's B_i @ A_i (a member without a LoRA gets zero rows: no update).
- No ``.alpha`` keys: the converter does not read them (one on a fused layer makes it fail), and
  without one both ComfyUI and diffusers use scale 1. So each module's alpha / rank scale is
  multiplied into its lora_B.
- The converter only runs on a file with an ``img_attn_qkv`` key. A LoRA with none (one trained on
  the single-stream blocks only, say) gets a zero rank-1 ``double_blocks.0.img_attn_qkv`` entry,
  which changes nothing in either loader but makes diffusers read the file as this format.
- ComfyUI's own model (comfy/ldm/hunyuan_video/model.py, on Flux's layers) names these layers
  ``double_blocks.0.img_attn.qkv``, ``img_mod.lin``, ``img_mlp.0``, ``single_blocks.0.modulation.lin``
  ...; its LoRA key map (comfy/lora.py, model_lora_keys_unet, "diffusion-pipe lora format") renames
  ``_attn.qkv.`` to ``_attn_qkv.``, ``_attn.proj.`` to ``_attn_proj.``, ``_mod.lin.`` to
  ``_mod.linear.``, ``mlp.0.``/``mlp.2.`` to ``mlp.fc1.``/``mlp.fc2.`` and ``.modulation.lin.`` to
  ``.modulation.linear.``: the original names, which are what both loaders read.
- Refused (no name both loaders read, or one the converter mangles): the time and guidance
  embedders and the token refiner's t_embedder and c_embedder (GLOBAL_MODULES), the token refiner's
  fused ``self_attn_qkv`` (the converter splits lora_A in thirds too, on the rank axis),
  ``final_layer.adaLN_modulation.1`` (it swaps the halves of lora_A's rank rows as of the weight's
  rows), the Conv3d patch embedding, norms, and peft's lora_bias.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .lora_modules import lora_modules

if TYPE_CHECKING:
    import torch

COMFY_PREFIX = "diffusion_model."

# Inside transformer_blocks.{i} (the original double_blocks.{i}): one diffusers module each.
DUAL_MODULES: dict[str, str] = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
}
# Fused original layer -> its diffusers members in row order.
DUAL_FUSED: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
# Inside single_transformer_blocks.{i} (the original single_blocks.{i}).
SINGLE_MODULES: dict[str, str] = {
    "proj_out": "linear2",
    "norm.linear": "modulation.linear",
}
SINGLE_FUSED: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
# Inside context_embedder.token_refiner.refiner_blocks.{i} (txt_in.individual_token_refiner.blocks.{i}).
REFINER_MODULES: dict[str, str] = {
    "attn.to_out.0": "self_attn_proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
    "norm_out.linear": "adaLN_modulation.1",
}
# Outside the blocks. Not the time, guidance and the token refiner's two embedders: ComfyUI builds
# them as Flux's MLPEmbedder (time_in.in_layer, txt_in.c_embedder.out_layer, ...) where the original
# code and so diffusers' converter name them time_in.mlp.0, txt_in.c_embedder.linear_2, ...: no name
# reads in both.
GLOBAL_MODULES: dict[str, str] = {
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "context_embedder.proj_in": "txt_in.input_embedder",
}

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|context_embedder\.token_refiner\.refiner_blocks)\.(\d+)\.(.+)$")
_ORIGINAL_STACK = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks",
                   "context_embedder.token_refiner.refiner_blocks": "txt_in.individual_token_refiner.blocks"}


def hunyuan_module_name(module: str) -> tuple[str, int | None]:
    """(original module name, member index within a fused layer or None) of a diffusers module name.

    Raises ValueError for a module with no name in ComfyUI's format, or one diffusers' converter
    cannot read back (module docstring).
    """
    match = _BLOCK.match(module)
    if match:
        stack, index, inner = match.groups()
        prefix = f"{_ORIGINAL_STACK[stack]}.{index}."
        singles, fused = {"transformer_blocks": (DUAL_MODULES, DUAL_FUSED),
                          "single_transformer_blocks": (SINGLE_MODULES, SINGLE_FUSED)}.get(stack, (REFINER_MODULES, {}))
        if inner in singles:
            return prefix + singles[inner], None
        for original, members in fused.items():
            if inner in members:
                return prefix + original, members.index(inner)
    elif module in GLOBAL_MODULES:
        return GLOBAL_MODULES[module], None
    raise ValueError(f"{module} has no name in ComfyUI's Hunyuan Video LoRA format that diffusers reads back")



def _scaled(up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * up in at least float32, back in up's dtype."""
    import torch

    return (up.to(torch.promote_types(up.dtype, torch.float32)) * scale).to(up.dtype)


def _member_widths(original: str, hidden_size: int, mlp_width: int) -> tuple[int, ...]:
    if original.startswith("single_blocks."):
        return (hidden_size, hidden_size, hidden_size, mlp_width)
    return (hidden_size, hidden_size, hidden_size)


def diffusers_to_comfy(state_dict: Mapping[str, torch.Tensor], scales: Mapping[str, float], *,
                       hidden_size: int, mlp_width: int) -> dict[str, torch.Tensor]:
    """ComfyUI-format tensors for a peft LoRA state dict of a HunyuanVideoTransformer3DModel.

    state_dict: peft keys (``transformer_blocks.0.attn.to_q.lora_A.weight``, optionally
    ``transformer.``-prefixed). scales: module name -> the LoRA's forward scale there (lora_alpha /
    r, or lora_alpha / sqrt(r) with rsLoRA), multiplied into lora_B. hidden_size (heads x head
    dim) and mlp_width (the single-stream MLP's width, hidden_size x mlp_ratio) size the rows of
    fused members without a LoRA. Tensors keep their dtype. Raises ValueError for a module the
    format cannot hold.
    """
    import torch

    modules = lora_modules(state_dict)

    # original name -> {member index or None: (lora_A, scaled lora_B)}
    layers: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, parts in modules.items():
        original, member = hunyuan_module_name(module)
        if ".lora_B.bias" in parts:
            raise ValueError(f"{module} has a LoRA bias (lora.bias), which diffusers' Hunyuan Video converter does not read")
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            raise ValueError(f"{module} has only one of lora_A / lora_B")
        down, up = parts[".lora_A.weight"], parts[".lora_B.weight"]
        if down.ndim != 2 or up.ndim != 2:
            raise ValueError(f"{module} is not a linear layer; ComfyUI's Hunyuan Video format holds linear LoRAs only")
        layers.setdefault(original, {})[member] = (down, _scaled(up, float(scales[module])))

    if not any(name.endswith(".img_attn_qkv") for name in layers):
        marker = torch.zeros(1, hidden_size)  # zero rank 1: no update, but diffusers sees the format
        layers["double_blocks.0.img_attn_qkv"] = {0: (marker, torch.zeros(hidden_size, 1))}

    out: dict[str, torch.Tensor] = {}
    for original, members in layers.items():
        name = COMFY_PREFIX + original
        if None in members:
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = members[None]
            continue
        widths = _member_widths(original, hidden_size, mlp_width)
        present = sorted(members)
        for i in present:
            if members[i][1].shape[0] != widths[i]:
                raise ValueError(f"{original} member {i} has {members[i][1].shape[0]} output rows; expected {widths[i]} "
                                 f"(hidden_size {hidden_size}, mlp_width {mlp_width})")
        dtype = members[present[0]][0].dtype
        downs = [members[i][0].to(dtype) for i in present]
        up = torch.zeros(sum(widths), sum(d.shape[0] for d in downs), dtype=members[present[0]][1].dtype)
        column = 0
        for i in present:
            row, (down, block) = sum(widths[:i]), members[i]
            up[row:row + widths[i], column:column + down.shape[0]] = block
            column += down.shape[0]
        out[f"{name}.lora_A.weight"] = torch.cat(downs, dim=0)
        out[f"{name}.lora_B.weight"] = up
    return out


__all__ = ["COMFY_PREFIX", "DUAL_FUSED", "DUAL_MODULES", "GLOBAL_MODULES", "REFINER_MODULES", "SINGLE_FUSED",
           "SINGLE_MODULES", "diffusers_to_comfy", "hunyuan_module_name"]
