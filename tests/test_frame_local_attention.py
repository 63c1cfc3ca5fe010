"""video_config.use_temporal_attention false: Wan self-attention sees only its own latent frame.

With frame-local attention every other layer of the Wan transformer works per token or per frame
(patch embedding with temporal patch 1, cross-attention to the caption, feed-forward, output
projection), so the prediction for one latent frame must not depend on any other frame's input.
With full attention it does. That is the behaviour the setting promises, tested on the real class.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from numerics import forward_tolerance

from core.models.tiny import build_tiny_model
from core.models.wan import WanAdapter

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md


@pytest.fixture(scope="module", params=["wan21", "wan22_ti2v_5b"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[WanAdapter, Path]:
    folder = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param) / "model")
    return WanAdapter(folder), folder


def _predict(adapter: WanAdapter, transformer: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    batch = {"prompt_embeds": torch.randn(latents.shape[0], 8, transformer.config.text_dim, generator=generator)}
    with torch.no_grad():
        return adapter.predict(transformer, latents, torch.tensor([0.6] * latents.shape[0]), batch)


def _frame_zero_moves(adapter: WanAdapter, transformer: torch.nn.Module) -> tuple[float, torch.Tensor]:
    """How much the prediction for latent frame 0 changes when only frame 2's input changes."""
    generator = torch.Generator().manual_seed(0)
    size = 2 * adapter.transformer_patch_size[1]
    latents = torch.randn(2, transformer.config.in_channels, 3, size, size, generator=generator)
    changed = latents.clone()
    changed[:, :, 2] += torch.randn(changed[:, :, 2].shape, generator=generator)
    before, after = _predict(adapter, transformer, latents), _predict(adapter, transformer, changed)
    return float((before[:, :, 0] - after[:, :, 0]).abs().max()), before


def test_frame_local_attention_keeps_each_frame_to_itself(model: tuple[WanAdapter, Path]) -> None:
    adapter, _ = model
    full = adapter.load_transformer("transformer", "cpu", torch.float32)
    moved_full, full_out = _frame_zero_moves(adapter, full)
    assert moved_full > 1e-4, "with full attention, frame 0 should see frame 2"

    local = adapter.load_transformer("transformer", "cpu", torch.float32)
    adapter.set_frame_local_attention(local)
    moved_local, local_out = _frame_zero_moves(adapter, local)
    assert moved_local < 1e-6, f"frame-local attention let frame 2 change frame 0 by {moved_local}"
    assert not torch.allclose(full_out, local_out), "frame-local attention changed nothing"


def test_frame_local_attention_on_frame_zero_equals_the_frame_alone(model: tuple[WanAdapter, Path]) -> None:
    """Frame 0 of a clip under frame-local attention equals frame 0 run as a one-frame clip by the
    unchanged model: the folding into the batch is exact, not an approximation. (Only frame 0: the
    rotary embedding encodes each frame's time position, which a frame run alone loses.)"""
    adapter, _ = model
    local = adapter.load_transformer("transformer", "cpu", torch.float32)
    adapter.set_frame_local_attention(local)
    full = adapter.load_transformer("transformer", "cpu", torch.float32)
    size = 2 * adapter.transformer_patch_size[1]
    latents = torch.randn(2, local.config.in_channels, 3, size, size, generator=torch.Generator().manual_seed(1))
    whole = _predict(adapter, local, latents)
    alone = _predict(adapter, full, latents[:, :, 0:1])
    # Folded, the frames are 3x the batch: other matrix shapes, for which the CPU's kernels may sum
    # in other orders. A leak from other frames moves frame 0 by far more (see the test above).
    tolerance = forward_tolerance(full) * alone.abs().max().item()
    torch.testing.assert_close(whole[:, :, 0:1], alone, rtol=0, atol=tolerance)
