"""objective.image_to_video_share: Wan 2.2 TI2V-5B learns first-frame-conditioned image-to-video from
the clip itself, as WanImageToVideoPipeline runs it: the first latent frame is the clean conditioning
image with timestep 0 on its tokens, and only the frames after it are learned."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from media_factory import make_clip
from numerics import mean_rtol

from core.config import load_preset, resolve
from core.errors import ConfigError
from core.models.objectives import expanded_timesteps
from core.train.draws import sample_first_frame_fixed
from core.train.objective import condition_first_frame, flow_matching_loss
from core.train.trainer import Trainer

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

OBJECTIVE = {"loss_weighting": "NONE"}


def test_timesteps_are_zero_on_the_first_frame_of_conditioned_samples_only() -> None:
    sigmas = torch.tensor([0.5, 0.25])
    steps = expanded_timesteps(sigmas, (2, 48, 3, 4, 4), (1, 2, 2), torch.tensor([True, False]))
    per_frame = 2 * 2  # tokens of one latent frame with a 2x2 patch over 4x4 latents
    assert steps.shape == (2, 3 * per_frame)
    assert torch.all(steps[0, :per_frame] == 0) and torch.all(steps[0, per_frame:] == 500)
    assert torch.all(steps[1] == 250)
    # The bool form is the same as the tensor form for a whole batch.
    torch.testing.assert_close(expanded_timesteps(sigmas, (2, 48, 3, 4, 4), (1, 2, 2), True),
                               expanded_timesteps(sigmas, (2, 48, 3, 4, 4), (1, 2, 2), torch.tensor([True, True])))


def test_the_first_frame_is_clean_for_conditioned_samples_only() -> None:
    latents, noisy = torch.zeros(2, 4, 3, 2, 2), torch.ones(2, 4, 3, 2, 2)
    out = condition_first_frame(noisy, latents, torch.tensor([True, False]))
    assert torch.all(out[0, :, 0] == 0) and torch.all(out[0, :, 1:] == 1)
    assert torch.all(out[1] == 1)


@pytest.mark.parametrize("temporal_weight", [0.0, 1.0])
def test_the_given_first_frame_is_not_learned(temporal_weight: float) -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 3, 2, 2, generator=generator)
    prediction = torch.randn(2, 4, 3, 2, 2, generator=generator, requires_grad=True)
    fixed = torch.tensor([True, False])
    loss, _ = flow_matching_loss(prediction, target, torch.tensor([0.5, 0.5]), OBJECTIVE, temporal_weight, first_frame_fixed=fixed)
    loss.backward()
    grad = prediction.grad
    assert torch.all(grad[0, :, 0] == 0), "the conditioning frame of sample 0 must get no gradient"
    assert grad[0, :, 1:].abs().sum() > 0 and grad[1, :, 0].abs().sum() > 0
    # Without conditioned samples the loss is the usual one.
    plain, _ = flow_matching_loss(prediction, target, torch.tensor([0.5, 0.5]), OBJECTIVE, temporal_weight)
    none_fixed, _ = flow_matching_loss(prediction, target, torch.tensor([0.5, 0.5]), OBJECTIVE, temporal_weight,
                                       first_frame_fixed=torch.tensor([False, False]))
    # Plain means against frame-weighted sums of the same non-negative squared errors, per sample.
    rtol = mean_rtol(target[0].numel())
    torch.testing.assert_close(plain, none_fixed, rtol=rtol, atol=0)


def test_the_share_is_drawn_per_sample_and_seeded() -> None:
    draws = torch.cat([sample_first_frame_fixed(list(range(8)), 3, step, 0.25) for step in range(100)])
    assert 0.15 < draws.float().mean() < 0.35
    assert torch.equal(draws, torch.cat([sample_first_frame_fixed(list(range(8)), 3, step, 0.25) for step in range(100)]))
    assert not sample_first_frame_fixed([0, 1], 3, 0, 0.0).any() and sample_first_frame_fixed([0, 1], 3, 0, 1.0).all()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    make_clip(folder / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (folder / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    return folder


def _config(model: Path, data: Path, tmp_path: Path, share: float) -> dict[str, Any]:
    return resolve(load_preset("#demo tiny wan LoRA"), {
        "base_model": str(model), "model_type": "AUTO", "datasets": [{"path": str(data)}], "resolution": 64,
        "workspace_dir": str(tmp_path / f"ws{share}"), "cache_dir": str(tmp_path / "cache"),
        "output_path": str(tmp_path / f"lora{share}.safetensors"), "dataloader_threads": 0, "max_steps": 2,
        "objective": {"image_to_video_share": share},
        "video_config": {"spatial_compression_ratio": 16},  # TI2V-5B's VAE (the refusal comes first for Wan 2.1)
    })


def test_ti2v_trains_image_to_video_and_other_models_refuse(clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tiny_model: Callable[[str], Path]) -> None:
    ti2v = tiny_model("wan22_ti2v_5b")
    seen: list[Any] = []
    from core.models.wan import WanAdapter

    predict = WanAdapter.predict

    def spy(self: WanAdapter, transformer: Any, noisy: Any, sigmas: Any, batch: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("first_frame_fixed"))
        return predict(self, transformer, noisy, sigmas, batch, **kwargs)

    monkeypatch.setattr(WanAdapter, "predict", spy)
    assert Trainer(_config(ti2v, clip, tmp_path, 1.0)).run().steps == 2
    assert seen and all(f is not None and bool(f.all()) for f in seen)
    seen.clear()
    Trainer(_config(ti2v, clip, tmp_path, 0.0)).run()
    assert seen and all(f is None for f in seen)

    wan21 = tiny_model("wan21")
    with pytest.raises(ConfigError) as info:
        Trainer(_config(wan21, clip, tmp_path, 0.5)).run()
    assert info.value.key == "objective.image_to_video_share"
