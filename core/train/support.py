"""What this version of the engine can do with a config, said before any work starts.

No declared setting may be silently ignored: a value the engine cannot honour is refused with a
message naming the key, so a run never trains something other than what was asked.
"""

from __future__ import annotations

from typing import Any

from core.config.settings import get_value, lookup
from core.errors import ConfigError
from core.memory.offload import offload_config_problem
from core.models.base import ModelAdapter
from core.models.registry import family_name

from .fsdp import fsdp_refusals

FLOAT_WEIGHT_DTYPES = ("FLOAT_32", "BFLOAT_16", "FLOAT_16")


def refusals(config: dict[str, Any], *, world_size: int = 1, cuda: bool | None = False,
             text_encoders: tuple[str, ...] = ("text_encoder",)) -> list[ConfigError]:
    """Settings whose value this engine cannot honour; training must not start with any.
    text_encoders: the family's text encoders by settings section (adapter.text_encoder_names).
    cuda None: not known yet (torch not imported): FINE_TUNE's checks, which need torch, are left out."""
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
        for part in text_encoders:
            if config[part]["train"]:
                refuse(f"{part}.train", f"{part}.train: LORA trains the transformer; train the text encoder with "
                       "FINE_TUNE, or turn it off")
        if not config["transformer"]["train"]:
            refuse("transformer.train", "transformer.train is off, so a LoRA run would train nothing; turn it on")
    elif method == "FINE_TUNE" and cuda is not None:
        from .finetune import finetune_problems

        out.extend(finetune_problems(config, cuda=cuda, world_size=world_size, text_encoders=text_encoders))
    elif method == "EMBEDDING":
        for part in ("transformer", *text_encoders):
            if config[part]["train"]:
                refuse(f"{part}.train", f"{part}.train: EMBEDDING trains only the new token embeddings; turn it off "
                       "(or train the weights with LORA or FINE_TUNE)")
    offload = offload_config_problem(config)  # offloading without checkpointing would save nothing
    if offload is not None:
        out.append(offload)
    if method == "LORA" and config["lora"]["decompose"] and config["output_format"] == "COMFY":
        # ComfyUI's weight_decompose normalises each input column (LyCORIS' default axis); peft's DoRA
        # each output row, so a file of peft's magnitudes would load as another adapter there.
        out.append(ConfigError("lora.decompose (DoRA) cannot be saved as COMFY: ComfyUI decomposes the weights on "
                               "the other axis than peft trains; set output_format to DIFFUSERS, or turn DoRA off",
                               key="lora.decompose", also=("output_format",)))
    quanto = ("FLOAT_8", "INT_8", "INT_4")
    if method == "LORA" and config["lora"]["decompose"] and config["transformer"]["weight_dtype"] in quanto:
        # peft's DoRA reads the base weight to normalise it, and cannot read optimum-quanto's storage.
        out.append(ConfigError(f"lora.decompose (DoRA) cannot train over transformer.weight_dtype "
                               f"{config['transformer']['weight_dtype']}: peft's DoRA cannot read those quantized weights; "
                               "use NFLOAT_4 or a float weight_dtype, or turn DoRA off",
                               key="lora.decompose", also=("transformer.weight_dtype",)))
    if method in ("LORA", "EMBEDDING") and not str(config["output_path"]).lower().endswith(".safetensors"):
        refuse("output_path", f"output_path {config['output_path']} must be a .safetensors file for {method}")
    return out


def start_refusals(config: dict[str, Any], adapter: ModelAdapter, *, world_size: int = 1,
                   cuda: bool | None = False) -> list[ConfigError]:
    """Everything a run refuses to start with for this model, in the order Trainer says them (it
    raises the first). cuda None: the engine is not loaded (the window while editing, before torch
    has been imported): what needs torch or the family's diffusers classes (FINE_TUNE's checks, the
    objective's weighting, frame sizes, the VAE's ratios) is left out, the rest is the same list."""
    problems = refusals(config, world_size=world_size, cuda=cuda, text_encoders=adapter.text_encoder_names)
    problems += fsdp_refusals(config, _trained_denoisers(config, adapter))
    if cuda is not None:
        if config["train_dtype"] == "FLOAT_16" and not cuda:
            # accelerate would silently compute in float32 on a CPU.
            problems.append(ConfigError("train_dtype FLOAT_16 needs a CUDA GPU; on a CPU use FLOAT_32 or BFLOAT_16", key="train_dtype"))
        try:
            adapter.objective(config["objective"])  # a weighting of another objective is refused here
        except ConfigError as e:
            problems.append(e)
    problems += capability_refusals(config, adapter)
    if cuda is not None:
        problems += size_refusals(config, adapter.size_divisor)
        ratio = ratio_refusal(config, adapter)
        if ratio is not None:
            problems.append(ratio)
    return problems


def _trained_denoisers(config: dict[str, Any], adapter: ModelAdapter) -> int | None:
    """How many denoisers the run trains; None where experts' settings are wrong (refused elsewhere)."""
    from .experts import chosen_denoisers

    try:
        return len(chosen_denoisers(config, adapter))
    except ConfigError:
        return None


def ratio_refusal(config: dict[str, Any], adapter: ModelAdapter) -> ConfigError | None:
    """video_config's compression ratios against the model's VAE (needs the family's VAE config)."""
    ratios = config["video_config"]
    wrong = [key for key, actual in (("spatial_compression_ratio", adapter.spatial_ratio),
                                     ("temporal_compression_ratio", adapter.temporal_ratio))
             if ratios[key] != actual]
    if not wrong:
        return None
    keys = tuple(f"video_config.{key}" for key in wrong)
    return ConfigError(
        f"video_config.spatial_compression_ratio/temporal_compression_ratio are "
        f"{ratios['spatial_compression_ratio']}/{ratios['temporal_compression_ratio']} but the model's VAE "
        f"compresses {adapter.spatial_ratio}x/{adapter.temporal_ratio}x; set them to "
        f"{adapter.spatial_ratio} and {adapter.temporal_ratio}",
        key=keys[0], also=keys[1:],
    )


def capability_refusals(config: dict[str, Any], adapter: ModelAdapter) -> list[ConfigError]:
    """Settings that ask the model for something its family cannot do, in the family's own name."""
    out = []
    name = family_name(adapter.family)
    method = config["training_method"]
    if method not in adapter.training_methods:
        out.append(ConfigError(
            f"training_method {method}: {name} trains with {' or '.join(adapter.training_methods)} in this version; "
            f"choose {adapter.training_methods[0]}", key="training_method"))
    out.extend(_unused_part_settings(config, adapter, name))
    if method == "FINE_TUNE" and adapter.finetune_text_encoders is not None:
        for section in adapter.text_encoder_names:
            if config[section]["train"] and section not in adapter.finetune_text_encoders:
                out.append(ConfigError(
                    f"{section}.train: {name} fine-tunes its transformer only in this version; turn it off",
                    key=f"{section}.train"))
    if config["objective"]["image_to_video_share"] > 0 and not adapter.image_to_video:
        out.append(ConfigError(
            f"objective.image_to_video_share: {name} cannot learn image-to-video from a clip's first frame "
            "(only a model whose timesteps can leave the first frame clean can); set it to 0",
            key="objective.image_to_video_share"))
    if config["transformer"]["model_path"] and len(adapter.transformer_names()) > 1:
        out.append(ConfigError(
            f"transformer.model_path replaces the transformer of a one-transformer model; {name} has "
            f"{len(adapter.transformer_names())} experts: point base_model at a diffusers folder holding "
            "them all, or leave it empty", key="transformer.model_path"))
    if not config["video_config"]["use_temporal_attention"] and not adapter.frame_local_attention:
        out.append(ConfigError(
            f"video_config.use_temporal_attention: {name} cannot restrict its attention to one frame here; turn it on",
            key="video_config.use_temporal_attention"))
    fixed = adapter.fixed_size
    if fixed is not None and config["sampling"]["prompts"]:
        for key, side in (("sampling.height", fixed[0]), ("sampling.width", fixed[1])):
            if int(get_value(config, key)) != side:
                out.append(ConfigError(
                    f"{key} {get_value(config, key)}: {name} makes videos of {fixed[1]}x{fixed[0]} pixels (width x height) "
                    f"only, the size its positional embeddings were learned at; set {key} to {side}", key=key))
    if config["training_method"] == "LORA" and config["output_format"] == "COMFY" and adapter.comfy_lora_keys() is None:
        out.append(ConfigError(f"output_format COMFY: {name} has no ComfyUI LoRA format here; set it to DIFFUSERS",
                               key="output_format"))
    return out


def _unused_part_settings(config: dict[str, Any], adapter: ModelAdapter, name: str) -> list[ConfigError]:
    """Settings of parts the model does not have, changed from their defaults: a second text encoder's
    section for a model with one, the distilled guidance for a transformer without that input, the
    experts' load-balancing weight for one without experts."""
    from core.config.settings import defaults

    default, out = defaults(), []
    for section in (k for k in config if k.startswith("text_encoder") and isinstance(config[k], dict)):
        if section in adapter.text_encoder_names or section not in default:
            continue
        changed = [key for key, value in config[section].items() if default[section].get(key) != value]
        if changed:
            out.append(ConfigError(
                f"{section}.{changed[0]}: {name} has no {section} (its text encoders: {', '.join(adapter.text_encoder_names)}), "
                f"so the setting would do nothing; leave {section} at its defaults", key=f"{section}.{changed[0]}"))
    scale = config["transformer"].get("guidance_scale")
    if not adapter.guidance_distilled and scale is not None and scale != default["transformer"]["guidance_scale"]:
        out.append(ConfigError(
            f"transformer.guidance_scale {scale}: {name}'s transformer takes no distilled-guidance input, so it would "
            f"do nothing; set it to {default['transformer']['guidance_scale']} (samples' guidance is sampling.guidance_scale)",
            key="transformer.guidance_scale"))
    for section in adapter.text_encoder_names:
        if not (config.get(section) or {}).get("keep_loaded"):
            continue
        if section not in adapter.live_text_encoders:
            out.append(ConfigError(f"{section}.keep_loaded: {name} caches its {section}'s outputs only; turn it off",
                                   key=f"{section}.keep_loaded"))
        elif config["training_method"] == "EMBEDDING" or config[section]["train"]:
            out.append(ConfigError(
                f"{section}.keep_loaded: a kept encoder encodes without gradients, so it cannot train or learn "
                f"embeddings; turn keep_loaded off (or {section}.train off)", key=f"{section}.keep_loaded"))
    weight = config["transformer"].get("moe_aux_loss_weight")
    if not adapter.mixture_of_experts and weight:
        out.append(ConfigError(
            f"transformer.moe_aux_loss_weight {weight}: {name}'s transformer has no mixture of experts, so there "
            "is no load-balancing loss to add; set it to 0", key="transformer.moe_aux_loss_weight"))
    return out


def size_refusals(config: dict[str, Any], divisor: int) -> list[ConfigError]:
    """Sizes the model cannot make as asked: its frame sides are multiples of `divisor` (the VAE's
    spatial compression times the transformer's patch size, adapter.size_divisor).

    Rounding them quietly would sample 64 pixels wide where 70 was asked; a resolution that is not a
    multiple gives buckets of another area, and for some values (70 at 16) no square one, so square
    clips would be cropped. The sample size matters only when there are prompts to sample.
    """
    keys = ["resolution"] + (["sampling.width", "sampling.height"] if config["sampling"]["prompts"] else [])
    out = []
    for key in keys:
        value = int(get_value(config, key))
        if value % divisor == 0:
            continue
        low, high = value // divisor * divisor, (value // divisor + 1) * divisor
        maximum = lookup(key).maximum
        nearest = [str(v) for v in (low, high) if v >= divisor and (maximum is None or v <= maximum)]
        if key == "resolution":
            effect = "the buckets' sides would be rounded to it, and square clips may lose their shape"
        else:
            effect = f"samples would be {max(divisor, low)} pixels {'wide' if key.endswith('width') else 'high'}"
        out.append(ConfigError(
            f"{key} {value} is not a multiple of {divisor}, which this model's frame sizes must be "
            f"({effect}); use {' or '.join(nearest)}",
            key=key,
        ))
    return out
