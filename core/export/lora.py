"""Write a trained LoRA of a transformer to one .safetensors file, for diffusers or for ComfyUI.

Two formats (docs/training.md, "LoRA files"):

- DIFFUSERS: exactly what a diffusers pipeline's ``save_lora_weights(dir, transformer_lora_layers=...,
  transformer_lora_adapter_metadata=...)`` writes, built with diffusers' own helpers
  (``pack_weights`` and the ``lora_adapter_metadata`` header): peft keys prefixed ``transformer.``
  (``transformer.blocks.0.attn1.to_q.lora_A.weight``), and the adapter's peft LoraConfig as JSON in
  the safetensors metadata, so the pipeline's ``load_lora_weights`` restores lora_alpha, the rank and
  the targets (without it diffusers would assume lora_alpha = rank).
- COMFY: ComfyUI's native names for the family, from the key map its adapter names
  (``ModelAdapter.comfy_lora_keys``: one module per family, core/export/comfy_<family>.py), with a
  scalar ``.alpha`` per block module. A family without one cannot be saved as COMFY.

Weights are stored in bfloat16 by default: half the size of float32, and the precision LoRA files
are usually shared in (ComfyUI computes the update in float32 from them either way); bf16 keeps
float32's range, so small lora_B values do not underflow as they can in float16. Pass
``dtype="fp32"`` for a bit-exact copy of the trained weights. Alpha scalars are always float32.

A two-expert model trains two denoisers; each gets its own file, named by expert_output_paths().
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.atomic import write_bytes_atomic, write_failure
from core.errors import UserError

if TYPE_CHECKING:
    import torch

# A family's ComfyUI key map: (peft state dict, module -> alpha / rank scale) -> ComfyUI's tensors.
# It raises ValueError for a module that has no name in ComfyUI's format.
ComfyKeys = Callable[[Mapping[str, "torch.Tensor"], Mapping[str, float]], dict[str, "torch.Tensor"]]

OUTPUT_FORMATS = ("DIFFUSERS", "COMFY")
SAVE_DTYPES = ("bf16", "fp16", "fp32")

# A two-expert model: pipeline component -> file name suffix. transformer is the high-noise expert
# (early, noisy steps; used while t >= boundary_ratio * 1000), transformer_2 the low-noise one.
EXPERT_SUFFIXES: dict[str, str] = {"transformer": "_high_noise", "transformer_2": "_low_noise"}

# The prefix of a pipeline's transformer in its LoRA files (diffusers' pipelines' transformer_name).
TRANSFORMER_PREFIX = "transformer"
# safetensors header keys this module writes itself.
_RESERVED_METADATA = ("format", "lora_adapter_metadata")


def _checked_path(path: str | os.PathLike) -> Path:
    """The output path as a Path, or a UserError when it cannot be a LoRA file."""
    target = Path(path).expanduser()
    if target.suffix.lower() != ".safetensors":
        raise UserError(f"{target}: a LoRA file name must end in .safetensors (for example my_lora.safetensors)")
    if target.is_dir():
        raise UserError(f"{target} is a folder; give a file name ending in .safetensors")
    return target


def expert_output_paths(output_path: str | os.PathLike, experts: list[str]) -> dict[str, Path]:
    """The file of each expert of a two-expert model: "transformer" -> STEM_high_noise.safetensors,
    "transformer_2" -> STEM_low_noise.safetensors, next to output_path (STEM.safetensors).

    For a model with one transformer, save to output_path itself. Raises UserError for an output
    path that is not a .safetensors name and ValueError for an expert not named above.
    """
    target = _checked_path(output_path)
    paths: dict[str, Path] = {}
    for expert in experts:
        if expert not in EXPERT_SUFFIXES:
            raise ValueError(f"unknown expert {expert!r}; expected one of {', '.join(EXPERT_SUFFIXES)}")
        paths[expert] = target.with_name(f"{target.stem}{EXPERT_SUFFIXES[expert]}{target.suffix}")
    return paths


def _unwrapped(transformer: Any) -> Any:
    return getattr(transformer, "_orig_mod", transformer)  # torch.compile's wrapper


def _adapter_name(transformer: Any, adapter_name: str | None) -> str:
    configs = getattr(transformer, "peft_config", None) or {}
    if adapter_name is not None:
        if adapter_name not in configs:
            raise ValueError(f"the transformer has no LoRA adapter named {adapter_name!r} (it has {sorted(configs)})")
        return adapter_name
    if len(configs) != 1:
        raise ValueError(f"expected one LoRA adapter on the transformer, found {sorted(configs) or 'none'}; name one")
    return next(iter(configs))


def lora_state_dict(transformer: Any, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's names (``blocks.0.attn1.to_q.lora_A.weight``), on the CPU.

    Uses peft's get_peft_model_state_dict, as diffusers' training scripts do; tensors keep their
    dtype. adapter_name defaults to the transformer's only adapter.
    """
    from peft.utils import get_peft_model_state_dict

    transformer = _unwrapped(transformer)
    name = _adapter_name(transformer, adapter_name)
    state = get_peft_model_state_dict(transformer, adapter_name=name)
    return {key: tensor.detach().to("cpu") for key, tensor in state.items()}


def lora_scales(transformer: Any, adapter_name: str | None = None) -> dict[str, float]:
    """Module name -> the adapter's forward scale there: lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA)."""
    from peft.tuners.lora import LoraLayer

    transformer = _unwrapped(transformer)
    name = _adapter_name(transformer, adapter_name)
    scales: dict[str, float] = {}
    for module_name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and name in module.r:
            r, alpha = module.r[name], module.lora_alpha[name]
            scales[module_name] = alpha / math.sqrt(r) if module.use_rslora.get(name, False) else alpha / r
    return scales


def _header(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """safetensors metadata (str -> str): "format": "pt" plus the caller's entries."""
    header = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or key in _RESERVED_METADATA:
            raise ValueError(f"metadata key {key!r} is reserved or not a string")
        header[key] = value if isinstance(value, str) else json.dumps(value)
    return header


def _adapter_metadata_json(config: Any) -> str:
    """The peft config as save_lora_weights stores it: keys prefixed "transformer.", JSON, sorted."""
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    packed = _pack_dict_with_prefix(config.to_dict(), TRANSFORMER_PREFIX)
    for key, value in packed.items():
        if isinstance(value, set):  # target_modules; diffusers writes list(value), we sort it
            packed[key] = sorted(value, key=str)
    return json.dumps(packed, indent=2, sort_keys=True, default=str)


def build_lora_tensors(
    transformer: Any,
    output_format: str,
    dtype: str = "bf16",
    adapter_name: str | None = None,
    comfy_keys: ComfyKeys | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, format-specific safetensors metadata) of the file save_lora writes."""
    import torch

    if output_format not in OUTPUT_FORMATS:
        raise UserError(f"unknown LoRA output format {output_format!r}; choose {' or '.join(OUTPUT_FORMATS)}")
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"unknown LoRA save dtype {dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    save_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    transformer = _unwrapped(transformer)
    name = _adapter_name(transformer, adapter_name)
    state = lora_state_dict(transformer, name)
    if not state:
        raise ValueError("the transformer's LoRA adapter has no weights")

    if output_format == "COMFY" and comfy_keys is None:
        raise UserError("this model family has no ComfyUI LoRA format here; set output_format to DIFFUSERS")
    if output_format == "DIFFUSERS":
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LoraBaseMixin

        layers = {key: tensor.to(save_dtype) for key, tensor in state.items()}
        tensors = LoraBaseMixin.pack_weights(layers, TRANSFORMER_PREFIX)
        extra = {LORA_ADAPTER_METADATA_KEY: _adapter_metadata_json(transformer.peft_config[name])}
    else:
        # No lora_adapter_metadata here: diffusers' loader bakes each .alpha into the weights it
        # converts, and a LoraConfig from metadata would scale them a second time.
        try:
            comfy = comfy_keys(state, lora_scales(transformer, name))
        except ValueError as e:
            raise UserError(f"the LoRA cannot be saved as COMFY: {e}; save it as DIFFUSERS or train other layers") from None
        tensors = {k: v if k.endswith(".alpha") else v.to(save_dtype) for k, v in comfy.items()}
        extra = {}
    return {key: tensor.contiguous() for key, tensor in tensors.items()}, extra


def save_lora(
    path: str | os.PathLike,
    transformer: Any,
    *,
    rank: int,
    alpha: float,
    output_format: str = "DIFFUSERS",
    metadata: Mapping[str, Any] | None = None,
    dtype: str = "bf16",
    adapter_name: str | None = None,
    comfy_keys: ComfyKeys | None = None,
) -> Path:
    """Write the transformer's LoRA to the .safetensors file path, atomically, and return the path.

    transformer: a diffusers transformer (either expert of a two-expert model) carrying one peft
    adapter (or name it with adapter_name). rank and alpha are the run's settings; they must be
    the adapter's r and lora_alpha. output_format: "DIFFUSERS" or "COMFY" (module docstring);
    COMFY needs the family's key map, comfy_keys (ModelAdapter.comfy_lora_keys()).
    metadata: extra safetensors header entries (non-string values are stored as JSON); "format"
    and "lora_adapter_metadata" are reserved. dtype: "bf16" (default), "fp16" or "fp32".

    The bytes go to a temporary file in the same folder that is renamed over path, so path holds
    either its old content or the whole new file. Raises UserError for a name not ending in
    .safetensors, a folder that cannot be created, a failed write, or a LoRA that the format
    cannot hold.
    """
    from safetensors.torch import save as safetensors_save

    target = _checked_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {target.parent} for the LoRA file: {e.strerror or e}") from None
    header = _header(metadata)

    config = _unwrapped(transformer).peft_config[_adapter_name(_unwrapped(transformer), adapter_name)]
    if config.r != rank or config.lora_alpha != alpha:
        raise ValueError(f"rank {rank} / alpha {alpha} differ from the adapter's r {config.r} / lora_alpha {config.lora_alpha}")

    tensors, extra = build_lora_tensors(transformer, output_format, dtype, adapter_name, comfy_keys)
    header.update(extra)
    data = safetensors_save(tensors, metadata=header)
    try:
        return write_bytes_atomic(target, data)
    except OSError as e:  # one line: the path, what failed, and what to do about it
        explained = write_failure(e, target, "the LoRA file")
        raise explained or UserError(f"could not write the LoRA file {target}: {e.strerror or e}") from None


__all__ = [
    "EXPERT_SUFFIXES",
    "TRANSFORMER_PREFIX",
    "ComfyKeys",
    "OUTPUT_FORMATS",
    "SAVE_DTYPES",
    "build_lora_tensors",
    "expert_output_paths",
    "lora_scales",
    "lora_state_dict",
    "save_lora",
]
