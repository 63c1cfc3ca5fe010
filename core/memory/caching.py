"""The model's parts as the estimate lists them, and the caching phase's peak GPU memory.

Before training, the caches are filled on the GPU (core/data/precompute.py): first the VAE alone
encodes every clip, then all the text encoders, loaded together, encode the captions CAPTION_BATCH
at a time. The caching peak is the larger of the two stages; the estimate compares it with the
training step's (Estimate.phase). A stage whose part is not sized here (a text encoder kind or a
VAE without a known layout) is counted without it, and `unsized` says which.
"""

from __future__ import annotations

from typing import Any

from .known_models import LLAVA_TOKENS, TEXT_ENCODER_TOKENS, VAE_ENCODE_FORMULAS, VAE_ENCODE_TILES, ModelConfigs
from .model_sizes import DTYPE_BYTES, TransformerSizes, compute_bytes, transformer_class
from .part_sizes import PartSizes, text_encoder_part, vae_encode_activation_bytes, vae_part

# core/data/precompute.py encodes this many captions per call (it imports the number from here).
CAPTION_BATCH = 4


def _section_dtype(config: dict[str, Any], name: str) -> str:
    section = config.get(name)
    return str(section["weight_dtype"]) if isinstance(section, dict) and "weight_dtype" in section else "FLOAT_32"


def text_parts(configs: ModelConfigs) -> dict[str, PartSizes | None]:
    return {name: text_encoder_part(name, c, configs.parameters.get(name)) for name, c in configs.encoders().items()}


def model_parts(config: dict[str, Any], configs: ModelConfigs, transformer_bytes: int, transformer: TransformerSizes,
                in_training: dict[str, bool]) -> list[dict[str, Any]]:
    """Every part the run loads, in the pipeline's order: the transformer(s), each text encoder, the
    VAE, each with its kind, weight_dtype, bytes in it (None where it is not sized here) and when it
    is on the GPU: "training" (the transformer, an encoder in the graph) or "caching"."""
    parts = [{"name": "transformer", "kind": transformer_class(transformer.config), "weight_dtype": config["transformer"]["weight_dtype"],
              "bytes": transformer_bytes, "parameters": transformer.parameters(), "when": "training"}]
    for name, sizes in text_parts(configs).items():
        dtype = _section_dtype(config, name)
        parts.append({"name": name, "kind": sizes.kind if sizes else str(configs.encoders()[name].get("model_type", "?")),
                      "weight_dtype": dtype, "bytes": sizes.weight_bytes(dtype) if sizes else None,
                      "parameters": sizes.parameters if sizes else None,
                      "when": "training" if in_training.get(name) else "caching"})
    vae = vae_part(configs.vae, configs.parameters.get("vae"))
    dtype = _section_dtype(config, "vae")
    parts.append({"name": "vae", "kind": str(configs.vae.get("_class_name", "VAE")), "weight_dtype": dtype,
                  "bytes": vae.weight_bytes(dtype) if vae else None, "parameters": vae.parameters if vae else None,
                  "when": "caching"})
    return parts


def caching_memory(config: dict[str, Any], configs: ModelConfigs, transformer: TransformerSizes, frames: int,
                   side: int) -> dict[str, Any]:
    """{"vae": bytes, "text": bytes, "peak": the larger, "tiled": bool, "unsized": [parts not counted]}
    for clips of `frames` frames of side x side pixels (the largest sample's area)."""
    unsized: list[str] = []
    vae_dtype = _section_dtype(config, "vae")
    b = DTYPE_BYTES.get(vae_dtype, compute_bytes(vae_dtype))
    vae = vae_part(configs.vae, configs.parameters.get("vae"))
    vae_class = str(configs.vae.get("_class_name", ""))
    tiles = VAE_ENCODE_TILES.get(vae_class)
    formula = VAE_ENCODE_FORMULAS.get(vae_class)
    if formula is not None:
        activations: int | None = formula(configs.vae, frames, side, side, b)
    else:
        activations = vae_encode_activation_bytes(configs.vae, tiles, frames, side, side, b)
    if vae is None:
        unsized.append("vae weights")
    if activations is None:
        unsized.append("vae activations")
    vae_stage = (vae.weight_bytes(vae_dtype) if vae else 0) + (activations or 0)

    tokens = TEXT_ENCODER_TOKENS.get(transformer_class(transformer.config), {})
    text_stage, largest = 0, 0
    for name, sizes in text_parts(configs).items():
        if sizes is None:
            unsized.append(name)
            continue
        dtype = _section_dtype(config, name)
        text_stage += sizes.weight_bytes(dtype)
        length = LLAVA_TOKENS if sizes.kind == "llava" else tokens.get(name, 77 if sizes.kind == "clip_text_model" else transformer.text_tokens)
        largest = max(largest, sizes.caching_activation_bytes(length, CAPTION_BATCH, compute_bytes(dtype)))
    text_stage += largest
    return {"vae": vae_stage, "text": text_stage, "peak": max(vae_stage, text_stage), "tiled": tiles is not None,
            "unsized": unsized}


def stage_sized(caching: dict[str, Any], stage: str) -> bool:
    """Whether a caching stage ("vae" or "text") has a figure: a stage of 0 bytes whose parts are all
    unsized is not sized (its 0 would read as free)."""
    unsized = caching.get("unsized", [])
    if stage == "vae":
        return caching["vae"] > 0 or not any(u.startswith("vae") for u in unsized)
    return caching["text"] > 0 or not any(u.startswith("text_encoder") for u in unsized)
