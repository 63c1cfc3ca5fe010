"""What a model takes, as plain data for code that must not load it: its frame counts and frame sizes.

The dataset doctor plans buckets and frame counts as training will; without the model it estimates
them from video_config (4k + 1 frames, sides a multiple of the spatial compression x 2). With a local
model folder (or one in the Hugging Face cache) the adapter's own answers are used: CogVideoX's
8k + 1 frames, the 5b-I2V's one frame size. Nothing is downloaded; nothing heavy is loaded (the
adapters read config files; some import diffusers to fill in their classes' defaults).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .frame_rule import FrameRule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    name: str  # what users call the model's family
    frame_rule: FrameRule
    size_divisor: int
    fixed_size: tuple[int, int] | None = None  # (height, width): every clip trains at it


def model_shape(config: dict[str, Any]) -> ModelShape | None:
    """The shape of config["base_model"] when it is at hand (a local folder, or cached); None when it
    is not, or cannot be read (training says why; the doctor then estimates from video_config)."""
    from .registry import adapter_for, family_name

    try:
        adapter = adapter_for(config, download=False)
        return ModelShape(family_name(adapter.family), adapter.frame_rule, adapter.size_divisor, adapter.fixed_size)
    except Exception as e:  # noqa: BLE001 - the doctor must report on the data whatever the model setting says
        logger.debug("model shape of %r not read: %s", config.get("base_model"), e)
        return None
