"""Fitting a budget: the least slow settings with which the estimate fits a GPU (`main.py estimate
--fit GB`, the out-of-memory advice). The training step's settings are searched first, then the
caching phase's (docs/memory.md, "--fit GB")."""

from __future__ import annotations

from typing import Any

from .estimate import Estimate, estimate_memory
from .known_models import ModelConfigs, model_configs


def _set(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(config)
    node = out
    *path, last = dotted.split(".")
    for key in path:
        node = node[key]
    node[last] = value
    return out


def _lighter(current: str, options: tuple[str, ...]) -> list[str]:
    """current, then the options that store the weights in fewer bytes."""
    size = {"FLOAT_32": 4, "BFLOAT_16": 2, "FLOAT_16": 2, "FLOAT_8": 1, "INT_8": 1, "INT_4": 0.5, "NFLOAT_4": 0.5}
    return [current] + [o for o in options if size[o] < size.get(current, 2)]


def propose_fit(config: dict[str, Any], vram_bytes: int, configs: ModelConfigs | None = None) -> tuple[dict[str, Any], Estimate] | None:
    """The least slow changes that make the estimate fit vram_bytes, as {dotted key: value}, with
    the estimate they give; {} if it fits as it is; None if nothing tried fits.

    The training step first, tried in this order (slowest last): the weight storage as it is, then
    FLOAT_8, then NFLOAT_4; within each, checkpointing as it is, then ON, then CPU_OFFLOADED; within
    each, the lowest layer_offload_fraction of 0, 0.25, 0.5, 0.75, 1 (at least the current one).
    Then, where filling the caches needs more than vram_bytes, the cached text encoders' storage:
    FLOAT_8, then NFLOAT_4 (the phases are apart: one's settings do not change the other's memory).
    """
    configs = configs or model_configs(config["base_model"])
    base = estimate_memory(config, configs)
    if base.fits(vram_bytes):
        return {}, base
    training = _fit_training(config, configs, vram_bytes)
    if training is None:
        return None
    changes, trial = training
    result = estimate_memory(trial, configs)
    if result.caching_needed_bytes > vram_bytes:
        caching = _fit_caching(trial, configs, vram_bytes)
        if caching is None:
            return None
        changes = {**changes, **caching[0]}
        result = estimate_memory(caching[1], configs)
    return changes, result


def _fit_training(config: dict[str, Any], configs: ModelConfigs, vram_bytes: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the changes, the config with them) that make the training step fit, or None."""
    order = ("OFF", "ON", "CPU_OFFLOADED")
    current_ckpt = config["gradient_checkpointing"]
    fractions = sorted({config["layer_offload_fraction"], *[f for f in (0.0, 0.25, 0.5, 0.75, 1.0) if f >= config["layer_offload_fraction"]]})
    fine_tune = config["training_method"] == "FINE_TUNE"
    original = {"transformer.weight_dtype": config["transformer"]["weight_dtype"],
                "gradient_checkpointing": current_ckpt, "layer_offload_fraction": config["layer_offload_fraction"]}
    for dtype in _lighter(config["transformer"]["weight_dtype"], ("FLOAT_8", "NFLOAT_4")) if not fine_tune else [config["transformer"]["weight_dtype"]]:
        for ckpt in order[order.index(current_ckpt):]:
            for fraction in fractions if ckpt != "OFF" else [0.0]:
                changes = {"transformer.weight_dtype": dtype, "gradient_checkpointing": ckpt, "layer_offload_fraction": fraction}
                trial = config
                for key, value in changes.items():
                    trial = _set(trial, key, value)
                if estimate_memory(trial, configs).needed_bytes <= vram_bytes:
                    return {k: v for k, v in changes.items() if original[k] != v}, trial
    return None


def _fit_caching(config: dict[str, Any], configs: ModelConfigs, vram_bytes: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the changes, the config with them) that make filling the caches fit, or None. The two stages
    run one after the other, so each is lightened only as far as it must be: the text encoders that
    are only cached (not trained) in FLOAT_8, then NFLOAT_4; the VAE in BFLOAT_16 (from FLOAT_32: it
    encodes a clip in half the memory; its latents are cached in bfloat16's precision)."""
    cached = [name for name in configs.encoders() if isinstance(config.get(name), dict) and not config[name].get("train")]
    text_options: list[dict[str, Any]] = [{}]
    for dtype in ("FLOAT_8", "NFLOAT_4"):
        changes = {f"{name}.weight_dtype": dtype for name in cached if dtype in _lighter(config[name]["weight_dtype"], (dtype,))[1:]}
        if changes:
            text_options.append(changes)
    vae_options: list[dict[str, Any]] = [{}]
    if config.get("vae", {}).get("weight_dtype") == "FLOAT_32":
        vae_options.append({"vae.weight_dtype": "BFLOAT_16"})
    for vae in vae_options:
        for text in text_options:
            changes = {**text, **vae}
            if not changes:
                continue
            trial = config
            for key, value in changes.items():
                trial = _set(trial, key, value)
            if estimate_memory(trial, configs).caching_needed_bytes <= vram_bytes:
                return changes, trial
    return None
