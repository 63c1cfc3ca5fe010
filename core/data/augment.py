"""What frame_dropout_probability and temporal_augmentation do (docs/data-pipeline.md, "Augmentation").

Frame dropout works on cached latents at batch time, so it costs nothing in caching. Temporal
augmentation changes which frames are encoded, so it is a number of cached variants per clip.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def drop_frames(latents: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each latent frame after the first by the one before it with probability p, per sample.

    latents is (B, C, F, H, W) (or one sample, (C, F, H, W)). A dropped frame shows what was shown
    before it, so a run of dropped frames repeats the last kept one: a stutter. p = 0 (or no frame
    drawn for dropping) returns the input itself; otherwise a new tensor (the input is never changed
    in place).
    """
    import torch

    if p <= 0.0:
        return latents
    if latents.ndim == 4:
        return drop_frames(latents[None], p, generator)[0]
    if latents.ndim != 5:
        raise ValueError(f"expected latents of shape (B, C, F, H, W), got {tuple(latents.shape)}")
    batch, _, frames = latents.shape[:3]
    if frames < 2:
        return latents
    draws = torch.rand((batch, frames), generator=generator, device=generator.device).tolist()
    # The source of frame t is the last kept frame at or before t. Plain Python over B x F numbers:
    # far fewer tensor operations than doing it with tensors, and this runs for every batch.
    sources, dropped = [], False
    for row in draws:
        last, source = 0, [0]
        for t in range(1, frames):
            if row[t] >= p:
                last = t
            else:
                dropped = True
            source.append(last)
        sources.append(source)
    if not dropped:
        return latents
    index = torch.tensor(sources, device=latents.device)
    return torch.stack([sample.index_select(1, frames_of) for sample, frames_of in zip(latents, index)])


def variant_count(config: Mapping[str, Any], is_video: bool = True) -> int:
    """How many variants of a clip are cached: cache_variants when the frames vary between uses
    (frame_sample_strategy random, or temporal_augmentation on), else 1. Images always have one."""
    video = config.get("video_config", {})
    varies = video.get("frame_sample_strategy") == "random" or bool(video.get("temporal_augmentation"))
    return max(1, int(config.get("cache_variants", 1))) if (is_video and varies) else 1
