"""A peft LoRA state dict grouped by module: what every ComfyUI key map (comfy_<family>.py) starts from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LORA_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


def split_lora_key(key: str) -> tuple[str, str]:
    """(module name, part) of a peft LoRA key: ``blocks.0.attn1.to_q.lora_A.weight`` ->
    (``blocks.0.attn1.to_q``, ``.lora_A.weight``)."""
    for part in LORA_PARTS:
        if key.endswith(part):
            return key[: -len(part)], part
    raise ValueError(f"{key} is not a LoRA weight (expected .lora_A.weight, .lora_B.weight or .lora_B.bias)")


def lora_modules(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {part: tensor}} of a peft LoRA state dict whose keys may carry ``transformer.``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, part = split_lora_key(key.removeprefix("transformer."))
        modules.setdefault(module, {})[part] = tensor
    return modules
