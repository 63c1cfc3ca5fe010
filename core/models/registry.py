"""From a run's config to its model adapter: which family a model folder holds, and the checks.

model_type AUTO reads the folder's model_index.json (written by the pipeline's save_pretrained);
an explicit model_type is checked against it, so a wrong choice is caught before anything loads.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from core.errors import ConfigError

from .base import ModelAdapter

logger = logging.getLogger(__name__)

# family -> (model_type setting value, what users call it)
FAMILIES: dict[str, tuple[str, str]] = {
    "wan21": ("WAN_2_1", "Wan 2.1"),
    "wan22_ti2v_5b": ("WAN_2_2_TI2V_5B", "Wan 2.2 TI2V-5B"),
    "wan22_a14b": ("WAN_2_2_A14B_T2V", "Wan 2.2 A14B text-to-video"),
    "wan22_a14b_i2v": ("WAN_2_2_A14B_I2V", "Wan 2.2 A14B image-to-video"),
    "wan21_i2v": ("", "Wan 2.1 image-to-video"),
    "hunyuan_video": ("HUNYUAN_VIDEO", "HunyuanVideo"),
    "cogvideox": ("COGVIDEOX", "CogVideoX"),
    "hidream": ("HIDREAM", "HiDream"),
}
TRAINABLE = ("wan21", "wan22_ti2v_5b", "wan22_a14b", "wan22_a14b_i2v")

_PIPELINE_FAMILIES = {
    "HunyuanVideoPipeline": "hunyuan_video",
    "CogVideoXPipeline": "cogvideox",
    "HiDreamImagePipeline": "hidream",
}

_WHAT_TO_DO = (
    "set base_model to a local diffusers model folder (the one holding model_index.json, "
    "vae/, text_encoder/, tokenizer/ and transformer/), or download the model first"
)


def _has_component(index: dict[str, Any], name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[0] is not None and value[1] is not None


# What a diffusers model repository holds that training and sampling need; other files (the original
# release's checkpoints, which some repositories carry beside the diffusers folders, images) are not fetched.
HUB_PATTERNS = ("model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                "tokenizer/*", "*/*.txt", "*/*.model", "*/*.json")


def _looks_like_hub_id(text: str, path: Path) -> bool:
    return text.count("/") == 1 and not path.is_absolute() and not text.startswith((".", "~"))


def resolve_model_folder(base_model: str, *, download: bool = True) -> Path:
    """base_model as a local folder: a path, or a Hugging Face hub id: taken from the local Hugging
    Face cache, and downloaded into it first when missing (unless `download` is False or the hub is
    switched off with HF_HUB_OFFLINE=1)."""
    text = str(base_model).strip()
    if not text:
        raise ConfigError(f"base_model is empty; {_WHAT_TO_DO}", key="base_model")
    path = Path(text).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.is_file():
        raise ConfigError(
            f"base_model {text} is a single file; put a single-file transformer checkpoint in transformer.model_path "
            f"and set base_model to the diffusers model it belongs to ({_WHAT_TO_DO})",
            key="base_model",
        )
    if not _looks_like_hub_id(text, path):
        raise ConfigError(f"base_model folder {path.absolute()} does not exist; {_WHAT_TO_DO}", key="base_model")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a dependency of diffusers
        raise ConfigError(f"base_model {text} is a hub id, but huggingface_hub cannot be imported ({exc})", key="base_model") from exc
    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=list(HUB_PATTERNS)))
    except LocalEntryNotFoundError:
        logger.debug("hub id %s is not in the local cache", text)
    except Exception as exc:  # a damaged cache entry: say so rather than download over it blindly
        logger.debug("hub id %s: local cache unusable: %s", text, exc)
    from huggingface_hub import constants

    if not download or constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"base_model {text} is not in the local Hugging Face cache and downloading is off "
            f"(HF_HUB_OFFLINE); download it once with an internet connection, or {_WHAT_TO_DO}",
            key="base_model",
        )
    logger.info("downloading %s from the Hugging Face hub into %s (once; later runs use the copy)", text, constants.HF_HUB_CACHE)
    try:
        return Path(snapshot_download(text, allow_patterns=list(HUB_PATTERNS)))
    except Exception as exc:  # no network, unknown repository, gated model, full disk: one line each
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"base_model {text} could not be downloaded ({reason}); check the id and the internet connection "
            f"(gated models need `huggingface-cli login`), or {_WHAT_TO_DO}",
            key="base_model",
        ) from exc


def detect_family(folder: str | os.PathLike) -> str:
    """The family of the model in a diffusers folder, from its model_index.json."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConfigError(f"{folder} has no model_index.json, so it is not a diffusers model folder; {_WHAT_TO_DO}", key="base_model")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{index_path} cannot be read ({exc}); re-download the model", key="base_model") from exc
    pipeline = str(index.get("_class_name", ""))
    two_experts = _has_component(index, "transformer_2")
    if pipeline == "WanPipeline":
        if index.get("expand_timesteps"):
            return "wan22_ti2v_5b"
        return "wan22_a14b" if two_experts else "wan21"
    if pipeline == "WanImageToVideoPipeline":
        return "wan22_a14b_i2v" if two_experts else "wan21_i2v"
    if pipeline in _PIPELINE_FAMILIES:
        return _PIPELINE_FAMILIES[pipeline]
    raise ConfigError(
        f"{index_path} names the pipeline {pipeline or '(none)'}, which this app does not know; "
        f"choose a Wan, HunyuanVideo, CogVideoX or HiDream diffusers folder",
        key="base_model",
    )


def family_for_model_type(model_type: str) -> str | None:
    """The family of a model_type setting value (None for AUTO)."""
    for family, (value, _) in FAMILIES.items():
        if value and value == model_type:
            return family
    return None


def adapter_for(config: dict[str, Any]) -> ModelAdapter:
    """The adapter for config["base_model"], checking config["model_type"] against the folder."""
    model_type = str(config.get("model_type", "AUTO") or "AUTO")
    chosen = family_for_model_type(model_type)
    if model_type != "AUTO" and chosen not in TRAINABLE:
        name = FAMILIES[chosen][1] if chosen else model_type
        raise ConfigError(f"{name} is not supported yet for training; choose a Wan model", key="model_type")
    folder = resolve_model_folder(config.get("base_model", ""))
    detected = detect_family(folder)
    if model_type != "AUTO" and chosen != detected:
        found_value, found_name = FAMILIES[detected]
        fix = f"set model_type to AUTO or {found_value}" if found_value else "set model_type to AUTO"
        raise ConfigError(
            f"model_type is {model_type}, but {folder} holds a {found_name} model; {fix}, "
            f"or point base_model at a {model_type} model",
            key="model_type",
            also=("base_model",),
        )
    if detected not in TRAINABLE:
        raise ConfigError(
            f"{folder} holds a {FAMILIES[detected][1]} model, which is not supported yet for training; choose a Wan model",
            key="base_model",
        )
    from .wan import WanAdapter

    logger.info("model %s: %s", folder, FAMILIES[detected][1])
    return WanAdapter(folder, family=detected)
