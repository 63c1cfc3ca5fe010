"""What this version of the engine can do with a config, said before any work starts.

No declared setting may be silently ignored: a value the engine cannot honour is refused with a
message naming the key, so a run never trains something other than what was asked.
"""

from __future__ import annotations

from typing import Any

from core.errors import ConfigError
from core.memory.offload import offload_config_problem

FLOAT_WEIGHT_DTYPES = ("FLOAT_32", "BFLOAT_16", "FLOAT_16")


def refusals(config: dict[str, Any], family: str, *, world_size: int = 1, cuda: bool = False) -> list[ConfigError]:
    """Settings whose value this engine cannot honour; training must not start with any."""
    out = []
    method = config["training_method"]

    def refuse(key: str, message: str) -> None:
        out.append(ConfigError(message, key=key))

    # The transformer's and the text encoder's Linear layers quantize (core/memory/quantize.py); the
    # VAE is convolutions, which no quantizer here handles, so its quantized storage would change nothing.
    dtype = config["vae"]["weight_dtype"]
    if dtype not in FLOAT_WEIGHT_DTYPES:
        refuse("vae.weight_dtype", f"vae.weight_dtype {dtype}: the VAE cannot be stored quantized; use BFLOAT_16 or FLOAT_32")
    if config["vae"]["train"]:
        refuse("vae.train", "vae.train: the VAE only encodes the clips (cached) and decodes samples; no method trains it, turn it off")
    if method == "LORA":
        if config["text_encoder"]["train"]:
            refuse("text_encoder.train", "text_encoder.train: LORA trains the transformer; train the text encoder with "
                   "FINE_TUNE, or turn it off")
        if not config["transformer"]["train"]:
            refuse("transformer.train", "transformer.train is off, so a LoRA run would train nothing; turn it on")
    elif method == "FINE_TUNE":
        from .finetune import finetune_problems

        out.extend(finetune_problems(config, cuda=cuda, world_size=world_size))
    elif method == "EMBEDDING":
        for part in ("transformer", "text_encoder"):
            if config[part]["train"]:
                refuse(f"{part}.train", f"{part}.train: EMBEDDING trains only the new token embeddings; turn it off "
                       "(or train the weights with LORA or FINE_TUNE)")
    offload = offload_config_problem(config)  # offloading without checkpointing would save nothing
    if offload is not None:
        out.append(offload)
    if method in ("LORA", "EMBEDDING") and not str(config["output_path"]).lower().endswith(".safetensors"):
        refuse("output_path", f"output_path {config['output_path']} must be a .safetensors file for {method}")
    return out
