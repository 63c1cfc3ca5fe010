"""From a run's config to its model adapter: which family a model folder holds, and the checks.

model_type AUTO reads the folder's model_index.json (written by the pipeline's save_pretrained);
an explicit model_type is checked against it, so a wrong choice is caught before anything loads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.model_folder import WHAT_TO_DO, resolve_model_folder

from .base import ModelAdapter
from .cogvideox import CogVideoXAdapter
from .hidream import HiDreamAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .wan import WanAdapter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One row of the table: a model family, or a variant of one that has its own model_type."""

    model_type: str  # the model_type setting's value ("" where the setting has none)
    name: str  # what users call it, in messages
    pipelines: tuple[str, ...]  # the _class_name of its folders' model_index.json
    adapter: type[ModelAdapter] | None = None  # None: recognised, not trainable yet


# Adding a family is one row here (and its adapter). Where several rows share a pipeline class, the
# adapter among them tells its variants apart from the folder (ModelAdapter.detect).
FAMILIES: dict[str, Family] = {
    "wan21": Family("WAN_2_1", "Wan 2.1", ("WanPipeline",), WanAdapter),
    "wan22_ti2v_5b": Family("WAN_2_2_TI2V_5B", "Wan 2.2 TI2V-5B", ("WanPipeline",), WanAdapter),
    "wan22_a14b": Family("WAN_2_2_A14B_T2V", "Wan 2.2 A14B text-to-video", ("WanPipeline",), WanAdapter),
    "wan22_a14b_i2v": Family("WAN_2_2_A14B_I2V", "Wan 2.2 A14B image-to-video", ("WanImageToVideoPipeline",), WanAdapter),
    "wan21_i2v": Family("", "Wan 2.1 image-to-video", ("WanImageToVideoPipeline",)),
    "hunyuan_video": Family("HUNYUAN_VIDEO", "HunyuanVideo", ("HunyuanVideoPipeline",), HunyuanVideoAdapter),
    "hunyuan_video_i2v": Family("HUNYUAN_VIDEO_I2V", "HunyuanVideo image-to-video", ("HunyuanVideoImageToVideoPipeline",),
                                HunyuanVideoAdapter),
    "cogvideox": Family("COGVIDEOX", "CogVideoX", ("CogVideoXPipeline",), CogVideoXAdapter),
    "cogvideox_i2v": Family("COGVIDEOX_I2V", "CogVideoX image-to-video", ("CogVideoXImageToVideoPipeline",), CogVideoXAdapter),
    "hidream": Family("HIDREAM", "HiDream", ("HiDreamImagePipeline",), HiDreamAdapter),
}
TRAINABLE = tuple(family for family, row in FAMILIES.items() if row.adapter is not None)


def family_name(family: str) -> str:
    """What users call a family id ("wan22_ti2v_5b" -> "Wan 2.2 TI2V-5B")."""
    return FAMILIES[family].name if family in FAMILIES else family


def _families_in_words(trainable_only: bool) -> str:
    """The families by their first name ("Wan", "CogVideoX"), in the table's order: "A, B or C"."""
    rows = [row for row in FAMILIES.values() if row.adapter is not None or not trainable_only]
    names = list(dict.fromkeys(row.name.split(" ")[0] for row in rows))
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def detect_family(folder: str | os.PathLike) -> str:
    """The family of the model in a diffusers folder, from its model_index.json."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConfigError(f"{folder} has no model_index.json, so it is not a diffusers model folder; {WHAT_TO_DO}", key="base_model")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{index_path} cannot be read ({exc}); re-download the model", key="base_model") from exc
    pipeline = str(index.get("_class_name", ""))
    rows = {family: row for family, row in FAMILIES.items() if pipeline in row.pipelines}
    for adapter in dict.fromkeys(row.adapter for row in rows.values() if row.adapter is not None):
        family = adapter.detect(index)
        if family in rows:
            return family
    if len(rows) == 1:
        return next(iter(rows))
    raise ConfigError(
        f"{index_path} names the pipeline {pipeline or '(none)'}, which this app does not know; "
        f"choose a {_families_in_words(trainable_only=False)} diffusers folder",
        key="base_model",
    )


def family_for_model_type(model_type: str) -> str | None:
    """The family of a model_type setting value (None for AUTO)."""
    for family, row in FAMILIES.items():
        if row.model_type and row.model_type == model_type:
            return family
    return None


def adapter_for(config: dict[str, Any], *, download: bool = True) -> ModelAdapter:
    """The adapter for config["base_model"], checking config["model_type"] against the folder.
    download False: a hub id that is not in the local cache is a ConfigError instead of a download
    (the window's checks while editing; core.model_folder.hub_download_needed tells them apart)."""
    model_type = str(config.get("model_type", "AUTO") or "AUTO")
    chosen = family_for_model_type(model_type)
    if model_type != "AUTO" and chosen not in TRAINABLE:
        name = family_name(chosen) if chosen else model_type
        raise ConfigError(f"{name} is not supported yet for training; choose a {_families_in_words(trainable_only=True)} model", key="model_type")
    folder = resolve_model_folder(config.get("base_model", ""), download=download)
    detected = detect_family(folder)
    found = FAMILIES[detected]
    if model_type != "AUTO" and chosen != detected:
        fix = f"set model_type to AUTO or {found.model_type}" if found.model_type else "set model_type to AUTO"
        raise ConfigError(
            f"model_type is {model_type}, but {folder} holds a {found.name} model; {fix}, "
            f"or point base_model at a {model_type} model",
            key="model_type",
            also=("base_model",),
        )
    if found.adapter is None:
        raise ConfigError(
            f"{folder} holds a {found.name} model, which is not supported yet for training; choose a {_families_in_words(trainable_only=True)} model",
            key="base_model",
        )
    logger.log(logging.INFO if download else logging.DEBUG, "model %s: %s", folder, found.name)
    adapter = found.adapter(folder, family=detected)
    adapter.configure(config)
    return adapter
