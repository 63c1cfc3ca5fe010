"""Validation loss (core/train/validation.py): fixed noise levels and noise make it a function of the
model alone; it routes each noise level to the right expert; the plateau warning fires on the
overfitting sign and only then; and the real data path caches the held-out clips it reads."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from media_factory import make_clip

from core.config import resolve
from core.data.cache import ContentHasher, LatentCache, TextCache
from core.data.dataset import CachedSample
from core.data.plan import plan_data
from core.data.precompute import fill_caches
from core.models.base import Denoiser
from core.models.objectives import FlowMatching, flow_target, noisy_inputs
from core.models.registry import adapter_for
from core.train.objective import flow_matching_loss
from core.train.validation import PlateauWatch, Validator, quantile_key, should_validate

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

KEYS = {"val_loss", "val_loss_q10", "val_loss_q30", "val_loss_q50", "val_loss_q70", "val_loss_q90"}
WHOLE = Denoiser("transformer", "transformer", 0.0, 1.0)


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _cache_clips(cache: Path, shapes: list[tuple[int, ...]], channels: int = 16) -> list[CachedSample]:
    """Cached entries as fill_caches writes them (latents; trimmed caption embeddings and the mask),
    made up, so no VAE or text encoder runs. The clips differ in size, as buckets do."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for n, shape in enumerate(shapes):
        latent, text = _key(f"latents {n}"), _key(f"text {n}")
        LatentCache(cache).put(latent, {"latents": torch.randn(channels, *shape, generator=generator)})
        mask = torch.zeros(512, dtype=torch.bool)
        mask[: 3 + n] = True
        TextCache(cache).put_text(text, torch.randn(512, 32, generator=generator), mask)
        samples.append(CachedSample((latent,), text))
    return samples


@pytest.fixture(scope="module")
def models(tiny_model: Callable[[str], Path]) -> dict[str, Path]:
    return {name: tiny_model(name) for name in ("wan21", "wan22_a14b")}


@pytest.fixture(scope="module")
def wan(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config = resolve({"base_model": str(models["wan21"])})
    adapter = adapter_for(config)
    cache = tmp_path_factory.mktemp("cache")
    return {"config": config, "adapter": adapter, "cache": cache,
            "samples": _cache_clips(cache, [(3, 4, 4), (2, 4, 6)])}


def _transformer(adapter: Any, name: str = "transformer") -> Any:
    return adapter.load_transformer(name, "cpu", torch.float32)


def test_the_loss_is_fixed_for_a_model_and_complete(wan: dict[str, Any]) -> None:
    model = _transformer(wan["adapter"]).train()
    validator = Validator(wan["adapter"], wan["config"], wan["samples"], wan["cache"])
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = validator.evaluate([(WHOLE, model)])
    assert torch.equal(torch.get_rng_state(), rng), "validation drew from the global RNG"
    assert model.training, "the model's train flag was not restored"
    assert set(first) == KEYS
    assert first["val_loss"] == pytest.approx(sum(first[k] for k in KEYS - {"val_loss"}) / 5)
    assert all(v > 0 for v in first.values())
    # Again, after the global RNG moved on, and from a fresh validator: the same numbers.
    torch.manual_seed(7)
    assert validator.evaluate([(WHOLE, model)]) == first
    model.eval()
    again = Validator(wan["adapter"], wan["config"], list(wan["samples"]), wan["cache"]).evaluate([(WHOLE, model)])
    assert again == first and not model.training
    # Another seed, other noise.
    other = Validator(wan["adapter"], {**wan["config"], "seed": 1}, wan["samples"], wan["cache"]).evaluate([(WHOLE, model)])
    assert other["val_loss"] != first["val_loss"]


def test_an_optimizer_step_changes_it(wan: dict[str, Any]) -> None:
    adapter = wan["adapter"]
    model = _transformer(adapter)
    validator = Validator(adapter, wan["config"], wan["samples"], wan["cache"])
    before = validator.evaluate([(WHOLE, model)])
    params = list(model.proj_out.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=0.1)
    batch = validator._batch(0)
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([0.5])
    prediction = adapter.predict(model.train(), noisy_inputs(latents, noise, sigmas), sigmas, batch)
    loss, _ = flow_matching_loss(prediction, flow_target(latents, noise), sigmas, wan["config"]["objective"])
    loss.backward()
    optimizer.step()
    after = validator.evaluate([(WHOLE, model)])
    assert after["val_loss"] != before["val_loss"]
    assert model.training


def test_runs_under_the_given_autocast_and_skips_a_missing_clip(wan: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    entered = []

    class Counting:
        def __enter__(self) -> None:
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc: object) -> None:
            return None

    gone = CachedSample((_key("never cached"),), wan["samples"][0].text_key)
    validator = Validator(wan["adapter"], wan["config"], [*wan["samples"], gone], wan["cache"], autocast=Counting)
    with caplog.at_level(logging.WARNING, logger="core.train.validation"):
        result = validator.evaluate([(WHOLE, _transformer(wan["adapter"]))])
    assert set(result) == KEYS
    assert entered == [False] * 10, "one forward per clip and quantile, without gradients"
    assert "validation clip left out" in caplog.text
    assert Validator(wan["adapter"], wan["config"], [], wan["cache"]).evaluate([(WHOLE, None)]) == {}


def test_two_experts_each_get_their_noise_levels(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = resolve({"base_model": str(models["wan22_a14b"]), "objective": {"timestep_distribution": "UNIFORM"}})
    adapter = adapter_for(config)
    high, low = adapter.denoisers()
    experts = {"transformer": _transformer(adapter, "transformer"), "transformer_2": _transformer(adapter, "transformer_2")}
    calls: list[tuple[str, float]] = []
    real = adapter.predict

    def spy(model, noisy, sigmas, batch, **kwargs):
        calls.append((next(n for n, m in experts.items() if m is model), float(sigmas[0])))
        return real(model, noisy, sigmas, batch, **kwargs)

    monkeypatch.setattr(adapter, "predict", spy)
    samples = _cache_clips(tmp_path, [(2, 4, 4)])
    validator = Validator(adapter, config, samples, tmp_path)
    assert validator.sigmas == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    result = validator.evaluate([(high, experts["transformer"]), (low, experts["transformer_2"])])
    assert set(result) == KEYS
    assert sorted(calls, key=lambda c: c[1]) == [("transformer_2", pytest.approx(s)) for s in (0.1, 0.3, 0.5, 0.7)] + [
        ("transformer", pytest.approx(0.9))]
    # The same through a callable sigma -> model, as the trainer's routes give it.
    calls.clear()
    by_sigma = validator.evaluate(lambda sigma: experts["transformer" if sigma >= high.low else "transformer_2"])
    assert by_sigma == result and len(calls) == 5
    # A run training only the high-noise expert validates only the noise levels it serves.
    calls.clear()
    only_high = validator.evaluate([(high, experts["transformer"])])
    assert set(only_high) == {"val_loss", "val_loss_q90"} and only_high["val_loss"] == result["val_loss_q90"]
    assert calls == [("transformer", pytest.approx(0.9))]
    assert validator.evaluate(lambda sigma: experts["transformer"] if sigma >= high.low else None) == only_high
    # The boundary itself belongs to the high-noise expert.
    edge = Validator(adapter, {**config, "objective": {**config["objective"], "min_timestep": high.low, "max_timestep": high.low}},
                     samples, tmp_path, quantiles=(0.5,))
    assert set(edge.evaluate([(low, experts["transformer_2"])])) == set()
    assert set(edge.evaluate([(high, experts["transformer"])])) == {"val_loss", "val_loss_q50"}


class _ImageConditioned:
    """An adapter whose cached entries carry an image condition after the video's 4 channels."""

    image_conditioned = True
    kept_text_encoders: tuple[str, ...] = ()  # every condition from the cache

    def __init__(self) -> None:
        self.conditions: list[tuple[int, ...] | None] = []

    def split_latents(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return cached[:, :4], cached[:, 4:]

    def objective(self, config_objective: dict) -> FlowMatching:
        return FlowMatching()

    def predict(self, model, noisy, sigmas, batch, first_frame_fixed=None, condition=None):
        assert first_frame_fixed is None and noisy.shape[1] == 4
        self.conditions.append(None if condition is None else tuple(condition.shape))
        return torch.zeros_like(noisy)


def test_an_image_conditioned_model_gets_its_condition(tmp_path: Path) -> None:
    adapter = _ImageConditioned()
    samples = _cache_clips(tmp_path, [(2, 4, 4)], channels=8)
    config = {"seed": 0, "objective": {}}
    result = Validator(adapter, config, samples, tmp_path, quantiles=(0.25, 0.75)).evaluate([(WHOLE, torch.nn.Identity())])
    assert set(result) == {"val_loss", "val_loss_q25", "val_loss_q75"}
    assert adapter.conditions == [(1, 4, 2, 4, 4)] * 2


def test_quantile_keys_and_schedule() -> None:
    assert [quantile_key(q) for q in (0.1, 0.5, 0.9, 0.125, 0.05)] == [
        "val_loss_q10", "val_loss_q50", "val_loss_q90", "val_loss_q12.5", "val_loss_q5"]
    config = {"validation": {"every_n_steps": 50}}
    assert [s for s in range(201) if should_validate(s, config)] == [50, 100, 150, 200]
    assert not any(should_validate(s, {"validation": {"every_n_steps": 0}}) for s in range(100))


def _feed(watch: PlateauWatch, vals: list[float], trains: list[float], every: int = 100) -> list[str | None]:
    return [watch.update(every * (n + 1), v, t) for n, (v, t) in enumerate(zip(vals, trains))]


def test_the_plateau_warning_fires_when_validation_stalls_while_training_falls() -> None:
    watch = PlateauWatch(patience=3)
    said = _feed(watch, [1.0, 0.9, 0.905, 0.95, 0.93, 0.99, 1.0], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert said[:4] == [None] * 4 and said[5:] == [None, None], said
    assert said[4] and "since step 200" in said[4] and "best 0.9" in said[4] and "backup from step 200" in said[4]
    # Once validation improves again the watch starts over, and may warn again later.
    assert watch.update(800, 0.5, 0.35) is None and watch.best_step == 800
    again = _feed(watch, [0.6, 0.6, 0.6], [0.3, 0.2, 0.1])
    assert again[:2] == [None, None] and again[2] and "since step 800" in again[2]


def test_no_warning_when_both_fall_or_both_stall() -> None:
    falling = PlateauWatch(patience=2)
    assert _feed(falling, [1.0, 0.9, 0.8, 0.7, 0.6], [1.0, 0.9, 0.8, 0.7, 0.6]) == [None] * 5
    converged = PlateauWatch(patience=2)
    assert _feed(converged, [1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.499, 0.5, 0.5]) == [None] * 5
    unknown = PlateauWatch(patience=1)
    assert _feed(unknown, [1.0, 1.0, float("nan"), 1.0], [None, None, 0.1, 0.1]) == [None] * 4


def test_the_watch_state_round_trips() -> None:
    watch = PlateauWatch(patience=3, min_relative_improvement=0.02)
    _feed(watch, [1.0, 0.8, 0.85, 0.9], [1.0, 0.9, 0.8, 0.7])
    restored = PlateauWatch()
    restored.load_state_dict(watch.state_dict())
    assert restored.state_dict() == watch.state_dict()
    # Both say the same next.
    assert restored.update(500, 0.95, 0.6) == watch.update(500, 0.95, 0.6) is not None


def test_held_out_clips_are_cached_by_the_real_data_path(models: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "clips"
    data.mkdir()
    for name, cuts in (("a", ()), ("b", (0.3,))):  # two different files: identical ones share a cache entry
        make_clip(data / f"{name}.mp4", width=64, height=64, fps=16, seconds=0.6, scene_cuts=cuts)
        (data / f"{name}.txt").write_text(f"clip {name}", encoding="utf-8")
    config = resolve({"base_model": str(models["wan21"]), "datasets": [{"path": str(data), "repeats": 1}],
                      "cache_dir": str(tmp_path / "cache"), "resolution": 64, "frames": 5,
                      "video_config": {"max_frames": 5, "target_fps": 16.0, "frame_sample_strategy": "random"},
                      "cache_variants": 3, "validation": {"holdout_fraction": 0.5}})
    adapter = adapter_for(config)
    plan = plan_data(config, adapter, ContentHasher(config["cache_dir"]))
    assert len(plan.train) == len(plan.validation) == 1
    # Training clips get every variant; a held-out clip only the one validation reads.
    assert len(plan.train[0].latent_keys) == 3 and len(plan.validation[0].latent_keys) == 1
    report = fill_caches(plan, adapter, config["cache_dir"])
    assert report.texts_computed == 2 and not report.failed
    (held,) = plan.validation
    assert LatentCache(config["cache_dir"]).has(held.latent_keys[0]) and TextCache(config["cache_dir"]).has(held.text_key)
    result = Validator(adapter, config, plan.validation, config["cache_dir"]).evaluate([(WHOLE, _transformer(adapter))])
    assert set(result) == KEYS and all(v > 0 for v in result.values())
