"""Frame selection: which timestamps of a clip make one training sample (docs/data-pipeline.md).

Pure functions of a MediaInfo, the settings and a variant index; no I/O. Times are seconds from the
start of the clip; the decoder takes, for each, the frame whose presentation time is nearest.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from core.config.schema import VIDEO_CONFIG
from core.config.settings import section_defaults

from .media import MediaInfo

_DEFAULTS = section_defaults(VIDEO_CONFIG)
_EPS = 1e-6  # float slack when turning times into candidate indices


@dataclass(frozen=True)
class FramePlan:
    """One sample's frames: their times in playback order of the file, and whether to play them backwards."""

    times: tuple[float, ...]
    reversed: bool = False


@dataclass(frozen=True)
class _Grid:
    """The candidates of rules 1-4: N times k / fps in the span, a window of W, a sample of F."""

    fps: float
    n: int
    w: int
    f: int


class NoAcceptedFrameCount(ValueError):
    """No frame count the model accepts fits in what a clip (or the frames setting) offers."""


def sample_length(frames: int, window: int, temporal_ratio: int, rule: Any = None) -> int:
    """Rule 4: `frames` rounded down to k * temporal_ratio + 1, or the largest such count in `window`.

    A window shorter than temporal_ratio + 1 gives 1. With `rule` (the model's FrameRule,
    ModelAdapter.frame_rule), the largest count it accepts instead; when none fits, raises
    NoAcceptedFrameCount (a rule that does not accept 1 frame has a shortest clip).
    """
    usable = max(1, min(int(frames), int(window)))
    if rule is not None:
        accepted = rule.round_down(usable)
        if accepted is None:
            raise NoAcceptedFrameCount(f"{usable} frames to pick from (frames {frames}, window {window}), fewer than the "
                                       f"model accepts: {rule.describe()}")
        return accepted
    r = max(1, int(temporal_ratio))
    return (usable - 1) // r * r + 1


def _setting(video_config: Mapping[str, Any] | None, name: str) -> Any:
    value = (video_config or {}).get(name)
    return _DEFAULTS[name] if value is None else value


def _rng(seed: int, content_key: str, variant: int, purpose: str) -> random.Random:
    """A generator seeded by a stable hash (Python's hash() of a str changes between runs)."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{content_key}\x1f{int(variant)}\x1f{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _grid(info: MediaInfo, frames: int, video_config: Mapping[str, Any] | None, rule: Any = None) -> _Grid:
    fps = float(_setting(video_config, "target_fps"))
    span = min(float(info.duration), float(_setting(video_config, "max_duration")))
    # Rules 1-2: candidates k / fps with 0 <= k / fps < span (the end is where the last frame stops).
    n = max(1, math.ceil(span * fps - _EPS))
    w = min(n, max(1, int(_setting(video_config, "max_frames"))))
    f = sample_length(frames, w, int(_setting(video_config, "temporal_compression_ratio")), rule)
    return _Grid(fps, n, w, f)


def _spread(start: int, w: int, f: int) -> list[int]:
    """Rule 5: F candidate indices spread evenly over the W-candidate window at `start`."""
    return [start + int(i) for i in np.round(np.linspace(0, w - 1, f))]


def _start_index(t: float, fps: float) -> int:
    # Round up: the candidate at or after a cut is nearest to a frame of the new scene, never the old one.
    return max(0, math.ceil(t * fps - _EPS))


def _times(indices: Sequence[int], fps: float) -> tuple[float, ...]:
    return tuple(i / fps for i in indices)


def _strategy_indices(
    grid: _Grid,
    video_config: Mapping[str, Any] | None,
    variant: int,
    seed: int,
    content_key: str,
    starts: Sequence[float] | None,
) -> list[int]:
    strategy = str(_setting(video_config, "frame_sample_strategy"))
    last_start = grid.n - grid.w  # the latest start at which a full window fits
    if strategy == "random":
        start = _rng(seed, content_key, variant, "start").randint(0, last_start)
    elif strategy == "keyframe":
        fitting = sorted({_start_index(t, grid.fps) for t in (starts or ()) if t >= -_EPS})
        fitting = [s for s in fitting if s <= last_start]
        start = fitting[variant % len(fitting)] if fitting else 0
    elif strategy == "uniform":
        start = 0
    else:
        raise ValueError(f"unknown frame_sample_strategy {strategy!r}")
    return _spread(start, grid.w, grid.f)


def select_frame_times(
    info: MediaInfo,
    *,
    frames: int,
    video_config: Mapping[str, Any] | None,
    variant: int = 0,
    seed: int = 0,
    content_key: str = "",
    starts: Sequence[float] | None = None,
    frame_rule: Any = None,
) -> list[float]:
    """The times (s) of one sample's F frames by rules 1-6; `starts` are keyframe or scene-cut times.

    Images give [0.0]. frame_rule: the model's accepted frame counts (see sample_length).
    """
    if not info.is_video:
        return [0.0]
    grid = _grid(info, frames, video_config, frame_rule)
    return list(_times(_strategy_indices(grid, video_config, variant, seed, content_key, starts), grid.fps))


def _augmented_indices(grid: _Grid, rng: random.Random) -> list[int]:
    """A random temporal crop: F consecutive candidates (or every other one) anywhere in the span."""
    strides = [s for s in (1, 2) if (grid.f - 1) * s + 1 <= grid.n]
    stride = rng.choice(strides)
    covered = (grid.f - 1) * stride + 1
    start = rng.randint(0, grid.n - covered)
    return [start + i * stride for i in range(grid.f)]


def plan_frames(
    info: MediaInfo,
    *,
    frames: int,
    video_config: Mapping[str, Any] | None,
    variant: int = 0,
    seed: int = 0,
    content_key: str = "",
    starts: Sequence[float] | None = None,
    frame_rule: Any = None,
) -> FramePlan:
    """One cached variant's frames, with temporal augmentation (docs "Augmentation") applied.

    Variant 0, and every variant when temporal_augmentation is off, is the plain selection. Other
    variants with it on are a random crop of the same F frames (stride 1 or 2, anywhere in the span)
    played backwards with probability one half. frame_rule: as for select_frame_times.
    """
    if not info.is_video:
        return FramePlan((0.0,), False)
    grid = _grid(info, frames, video_config, frame_rule)
    if variant == 0 or not bool(_setting(video_config, "temporal_augmentation")):
        indices = _strategy_indices(grid, video_config, variant, seed, content_key, starts)
        return FramePlan(_times(indices, grid.fps), False)
    rng = _rng(seed, content_key, variant, "augment")
    indices = _augmented_indices(grid, rng)
    return FramePlan(_times(indices, grid.fps), rng.random() < 0.5)
