"""What this version of the engine can do with a config, said before any work starts.

No declared setting may be silently ignored: a value the engine cannot honour yet is refused with
a message naming the key (so a run never trains something other than what was asked), and a
feature that changes nothing about the trained weights but is not available yet is announced.
"""

from __future__ import annotations

from typing import Any

from core.errors import ConfigError
from core.memory.offload import offload_config_problem

FLOAT_WEIGHT_DTYPES = ("FLOAT_32", "BFLOAT_16", "FLOAT_16")


def refusals(config: dict[str, Any], family: str) -> list[ConfigError]:
    """Settings whose value this engine cannot honour yet; training must not start with any."""
    out = []

    def refuse(key: str, message: str) -> None:
        out.append(ConfigError(message, key=key))

    if config["training_method"] != "LORA":
        refuse("training_method", f"training_method {config['training_method']} is not available yet; this version trains LORA")
    # The transformer's and the text encoder's Linear layers quantize (core/memory/quantize.py); the
    # VAE is convolutions, which no quantizer here handles, so its quantized storage would change nothing.
    dtype = config["vae"]["weight_dtype"]
    if dtype not in FLOAT_WEIGHT_DTYPES:
        refuse("vae.weight_dtype", f"vae.weight_dtype {dtype}: the VAE cannot be stored quantized; use BFLOAT_16 or FLOAT_32")
    for part in ("text_encoder", "vae"):
        if config[part]["train"]:
            refuse(f"{part}.train", f"{part}.train: this version trains LoRA on the transformer only; turn it off")
    if not config["transformer"]["train"]:
        refuse("transformer.train", "transformer.train is off, so a LoRA run would train nothing; turn it on")
    offload = offload_config_problem(config)  # offloading without checkpointing would save nothing
    if offload is not None:
        out.append(offload)
    if not str(config["output_path"]).lower().endswith(".safetensors"):
        refuse("output_path", f"output_path {config['output_path']} must be a .safetensors file for a LoRA")
    return out


def announcements(config: dict[str, Any]) -> list[str]:
    """Features the config asks for that this version does not provide yet (training is unaffected)."""
    notes = []
    if config["sampling"]["every_n_steps"] and config["sampling"]["prompts"]:
        notes.append("sampling during training is not available yet: no sample videos will be made")
    if config["backup"]["every_n_steps"]:
        notes.append("backups are not available yet: an interrupted run starts again from the beginning")
    if config["validation"]["every_n_steps"]:
        notes.append("validation loss is not available yet: validation clips are held out but not evaluated")
    return notes
