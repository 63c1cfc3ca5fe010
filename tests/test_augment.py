"""Frame dropout on latents and the number of cached variants."""

from __future__ import annotations

import pytest
import torch

from core.config.settings import defaults
from core.data.augment import drop_frames, variant_count


def _latents(batch: int = 4, frames: int = 12) -> torch.Tensor:
    # Each frame is filled with a distinct value, so which frame went where can be read back.
    values = torch.arange(batch * frames, dtype=torch.float32).view(batch, 1, frames, 1, 1)
    return values.expand(batch, 3, frames, 2, 2).clone()


def _sources(out: torch.Tensor, original: torch.Tensor) -> list[list[int]]:
    """For each sample and output frame, the index of the input frame it shows."""
    frames = original.shape[2]
    return [
        [next(t for t in range(frames) if torch.equal(out[b, :, s], original[b, :, t])) for s in range(frames)]
        for b in range(original.shape[0])
    ]


def test_p_zero_returns_the_input() -> None:
    latents = _latents()
    assert drop_frames(latents, 0.0, torch.Generator().manual_seed(0)) is latents


def test_dropped_frames_repeat_the_previous_kept_frame() -> None:
    latents = _latents(batch=8, frames=12)
    original = latents.clone()
    out = drop_frames(latents, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(latents, original)  # not changed in place
    assert out.shape == latents.shape
    sources = _sources(out, original)
    dropped = 0
    for row in sources:
        assert row[0] == 0  # the first frame always stays
        for t in range(1, len(row)):
            # Either kept, or a copy of what the frame before it shows.
            assert row[t] == t or row[t] == row[t - 1]
            dropped += row[t] != t
    assert 0 < dropped < 8 * 11
    # Per sample: rows differ.
    assert len({tuple(r) for r in sources}) > 1


def test_dropout_is_deterministic_per_generator_seed() -> None:
    latents = _latents(batch=6, frames=10)
    a = drop_frames(latents, 0.25, torch.Generator().manual_seed(5))
    b = drop_frames(latents, 0.25, torch.Generator().manual_seed(5))
    c = drop_frames(latents, 0.25, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_p_one_freezes_on_the_first_frame_and_one_sample_works() -> None:
    latents = _latents(batch=2, frames=5)
    out = drop_frames(latents, 1.0, torch.Generator())
    assert torch.equal(out, latents[:, :, :1].expand_as(latents))
    single = drop_frames(latents[0], 1.0, torch.Generator())
    assert torch.equal(single, out[0])
    image = latents[:, :, :1]
    assert torch.equal(drop_frames(image, 0.5, torch.Generator()), image)
    with pytest.raises(ValueError):
        drop_frames(torch.zeros(3, 4), 0.5, torch.Generator())


def test_dropout_rate_is_about_p() -> None:
    latents = _latents(batch=200, frames=21)
    out = drop_frames(latents, 0.2, torch.Generator().manual_seed(0))
    changed = (out != latents).flatten(3).any(dim=(1, 3)).float().mean().item()
    assert 0.17 < changed * 21 / 20 < 0.23


def test_variant_count() -> None:
    config = defaults()
    config["cache_variants"] = 4
    assert config["video_config"]["frame_sample_strategy"] == "uniform"
    assert not config["video_config"]["temporal_augmentation"]
    assert variant_count(config) == 1
    config["video_config"]["frame_sample_strategy"] = "random"
    assert variant_count(config) == 4
    assert variant_count(config, is_video=False) == 1
    config["video_config"]["frame_sample_strategy"] = "keyframe"
    config["video_config"]["temporal_augmentation"] = True
    assert variant_count(config) == 4
    config["cache_variants"] = 1
    assert variant_count(config) == 1
