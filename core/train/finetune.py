"""training_method FINE_TUNE: which weights train, at which learning rates, and what cannot work.

Weight precision (decided here, documented in the settings' help): the trained weights are kept in their
part's weight_dtype. BFLOAT_16 trains bfloat16 weights in place, with optimizer state in bfloat16 too
(AdamW) or factored (Adafactor) or 8-bit (ADAMW_8BIT): what lets a 14B expert fit a 48 GB GPU, at the
cost that updates far below a weight's bfloat16 resolution are lost. FLOAT_32 keeps float32 master
weights and state (autocast still computes in train_dtype). FLOAT_16 weights are refused (no loss scaler
can unscale float16 gradients held by float16 weights), and so are quantized ones (there is nothing to
take a gradient of in a packed int8/fp8/nf4 tensor).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError
from core.train.optim_checks import optimizer_problem

log = logging.getLogger(__name__)

QUANTIZED = ("FLOAT_8", "INT_8", "INT_4", "NFLOAT_4")
TRAINABLE_WEIGHT_DTYPES = ("FLOAT_32", "BFLOAT_16")


def make_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every weight of `model` requires grad and the model is in train mode; its parameters, in order."""
    params = list(model.parameters())  # parameters() already lists a tied weight once
    for param in params:
        if not param.is_floating_point():
            raise ValueError(f"{type(model).__name__} holds a {param.dtype} (quantized) weight, which cannot be fine-tuned")
    model.requires_grad_(True)
    model.train()
    return params


def _part_lr(config: dict[str, Any], part: str) -> float:
    lr = config[part]["learning_rate"]
    return float(config["learning_rate"] if lr is None else lr)  # 0.0 means frozen, not "unset"


def finetune_param_groups(
    config: dict[str, Any], transformers: Sequence[torch.nn.Module],
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for FINE_TUNE: one per transformer (expert) at transformer.learning_rate, and one
    per text encoder whose section (text_encoder, text_encoder_2, ...: the names of `text_encoders`,
    the adapter's text_encoder_names that train) says train, at that section's learning_rate. Each
    group carries "name".

    `transformers` are the ones that train (for a two-expert model those experts.train chooses). A part whose
    learning rate is 0 gets no group: it stays frozen and takes no optimizer memory.
    """
    groups: list[dict[str, Any]] = []
    transformer_lr = _part_lr(config, "transformer")
    if config["transformer"]["train"] and transformer_lr > 0:
        for i, transformer in enumerate(transformers):
            name = "transformer" if i == 0 else f"transformer_{i + 1}"
            groups.append({"params": [p for p in transformer.parameters() if p.requires_grad], "lr": transformer_lr, "name": name})
    encoders = dict(text_encoders or {})
    if config["text_encoder"]["train"] and "text_encoder" not in encoders:
        raise ValueError("text_encoder.train is on but no text encoder was given")
    for part, encoder in encoders.items():
        if not config[part]["train"]:
            continue
        encoder_lr = _part_lr(config, part)
        if encoder_lr > 0:
            groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": encoder_lr, "name": part})
    groups = [g for g in groups if g["params"]]
    for group in groups:
        log.info("fine-tune group %s: %d tensors, %d weights, lr %g", group["name"], len(group["params"]),
                 sum(p.numel() for p in group["params"]), group["lr"])
    return groups


def finetune_problems(config: dict[str, Any], cuda: bool, world_size: int = 1,
                      text_encoders: Sequence[str] = ("text_encoder",)) -> list[ConfigError]:
    """Every reason this FINE_TUNE config cannot run, each naming its key; empty for other methods.
    text_encoders: the family's text encoders (adapter.text_encoder_names), each checked by its section."""
    if config["training_method"] != "FINE_TUNE":
        return []
    problems: list[ConfigError] = []
    parts = [("transformer", config["transformer"]["train"])]
    parts += [(name, True) for name in text_encoders if config[name]["train"]]
    for part, trains in parts:
        dtype = config[part]["weight_dtype"]
        if trains and dtype in QUANTIZED:
            problems.append(ConfigError(
                f"{part}.weight_dtype {dtype} cannot be fine-tuned (quantized weights take no gradient); "
                "choose BFLOAT_16 (or FLOAT_32), or train a LoRA on the quantized model",
                key=f"{part}.weight_dtype", also=("training_method",)))
        elif trains and dtype not in TRAINABLE_WEIGHT_DTYPES:
            problems.append(ConfigError(
                f"{part}.weight_dtype {dtype} cannot be fine-tuned (float16 weights overflow and no loss scaler "
                "can unscale their gradients); choose BFLOAT_16 or FLOAT_32",
                key=f"{part}.weight_dtype", also=("training_method",)))
    if config["layer_offload_fraction"] > 0:
        problems.append(ConfigError(
            "layer_offload_fraction must be 0 for FINE_TUNE: offloading streams frozen weights only, and here "
            "every weight trains; use fused_backward, ADAFACTOR or ADAMW_8BIT to save memory instead",
            key="layer_offload_fraction", also=("training_method",)))
    output = str(config["output_path"]).strip()
    if output.lower().endswith(".safetensors"):
        problems.append(ConfigError(
            f"output_path {output} is a .safetensors file, but FINE_TUNE saves a whole diffusers model folder; "
            "choose a folder path (without .safetensors)",
            key="output_path", also=("training_method",)))
    elif output and Path(output).expanduser().is_file():
        problems.append(ConfigError(
            f"output_path {output} is an existing file, but FINE_TUNE saves a folder there; choose another path",
            key="output_path", also=("training_method",)))
    problem = optimizer_problem(config["optimizer"], cuda)
    if problem:
        problems.append(ConfigError(problem, key="optimizer"))
    if config["fused_backward"]:
        problems.extend(_fused_problems(config, world_size))
    return problems


def _fused_problems(config: dict[str, Any], world_size: int) -> list[ConfigError]:
    problems = []
    steps = config["gradient_accumulation_steps"]
    if steps > 1:
        problems.append(ConfigError(
            f"fused_backward needs gradient_accumulation_steps 1 (it is {steps}): each weight is updated as soon as "
            "its gradient is ready, so gradients cannot add up over several steps; set it to 1 or turn fused_backward off",
            key="fused_backward", also=("gradient_accumulation_steps",)))
    norm = config["max_grad_norm"]
    if norm > 0:
        problems.append(ConfigError(
            f"fused_backward needs max_grad_norm 0 (it is {norm:g}): a total gradient norm needs every gradient at once; "
            "set max_grad_norm to 0 (ADAFACTOR clips each update itself) or turn fused_backward off",
            key="fused_backward", also=("max_grad_norm",)))
    if world_size > 1:
        problems.append(ConfigError(
            f"fused_backward runs on one GPU only ({world_size} processes here): the multi-GPU gradient exchange "
            "happens after the fused update would already have used each process's own gradient; "
            "run on one GPU or turn fused_backward off",
            key="fused_backward"))
    if config["optimizer"] == "PRODIGY":
        problems.append(ConfigError(
            "fused_backward cannot use optimizer PRODIGY: its step size is estimated over all weights together, "
            "not one weight at a time; choose ADAFACTOR, ADAMW_8BIT or ADAMW",
            key="fused_backward", also=("optimizer",)))
    if config["train_dtype"] == "FLOAT_16":
        problems.append(ConfigError(
            "fused_backward cannot use train_dtype FLOAT_16: its loss scaler must see every gradient before any "
            "weight is updated; choose BFLOAT_16",
            key="fused_backward", also=("train_dtype",)))
    return problems
