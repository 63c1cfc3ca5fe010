"""Wan 2.2 A14B's two experts (core/train/experts.py): each optimizer step's noise levels fall on one
side of the boundary, only that side's expert changes, and each trained expert gets its own file
that loads into the pipeline's matching transformer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from media_factory import make_clip

from core.config import load_preset, resolve
from core.errors import ConfigError
from core.export.lora import lora_state_dict
from core.models.base import SampleRequest
from core.train import loop as loop_module
from core.train import optim as optim_module
from core.train.events import TrainerCallbacks
from core.train.experts import denoiser_objective, route
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

BOUNDARY = 0.875  # the tiny A14B's model_index.json, as the real T2V model's


@pytest.fixture(scope="module")
def a14b(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan22_a14b")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    make_clip(folder / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (folder / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    return folder


def _config(model: Path, data: Path, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    overlay: dict[str, Any] = {
        "base_model": str(model),
        "model_type": "AUTO",
        "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(tmp_path / "workspace"),
        "cache_dir": str(tmp_path / "cache"),
        "output_path": str(tmp_path / "out" / "lora.safetensors"),
        "dataloader_threads": 0,
        "max_steps": 12,
        "learning_rate": 0.003,
        "warmup_steps": 0,  # every step must move its expert's LoRA, the first one too
        "lr_scheduler": "CONSTANT",
        # The default SHIFTED distribution puts most steps above 0.875; uniform gives both sides.
        "objective": {"timestep_distribution": "UNIFORM"},
        **sections,
    }
    return resolve(load_preset("#demo tiny wan LoRA"), overlay)


class _Watch(TrainerCallbacks):
    """After every step: which expert's LoRA changed, and the step's noise levels."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.sigmas: dict[int, list[float]] = {}
        self.changed: list[tuple[str, set[str]]] = []
        self.initial: dict[str, dict[str, torch.Tensor]] = {}
        self._last: dict[str, dict[str, torch.Tensor]] = {}

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.clone() for k, v in lora_state_dict(m).items()} for name, m in self.models.items()}

    def on_metrics(self, record: dict[str, Any]) -> None:
        now = self.snapshot()
        if not self._last:  # the LoRA starts with B = 0; compare against the state before step 1
            self._last = self.initial
        moved = {name for name in now if any(not torch.equal(now[name][k], self._last[name][k]) for k in now[name])}
        self.changed.append((record["expert"], moved))
        self._last = now


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> _Watch:
    watch = _Watch()
    load = Trainer._load_denoiser
    noise = loop_module.sample_noise

    def load_and_keep(self: Trainer, adapter: Any, name: str, accelerator: Any) -> Any:
        model = load(self, adapter, name, accelerator)
        watch.models[name] = model
        return model

    def noise_and_keep(shape: Any, positions: list[int], seed: int, step: int, objective: dict[str, Any]) -> Any:
        sigmas, drawn = noise(shape, positions, seed, step, objective)
        watch.sigmas[step] = sigmas.tolist()
        return sigmas, drawn

    build_optimizer = optim_module.build_optimizer

    def snapshot_and_build(*args: Any, **kwargs: Any) -> Any:
        watch.initial = watch.snapshot()  # every expert has its LoRA now, untrained
        return build_optimizer(*args, **kwargs)

    monkeypatch.setattr(Trainer, "_load_denoiser", load_and_keep)
    monkeypatch.setattr(loop_module, "sample_noise", noise_and_keep)
    monkeypatch.setattr(optim_module, "build_optimizer", snapshot_and_build)
    return watch


def test_each_step_trains_only_the_expert_of_its_noise_levels(a14b: Path, clip: Path, tmp_path: Path, watched: _Watch) -> None:
    config = _config(a14b, clip, tmp_path)
    result = Trainer(config, callbacks=watched).run()
    assert result.steps == 12
    experts = [expert for expert, _ in watched.changed]
    assert set(experts) == {"transformer", "transformer_2"}, f"12 uniform steps should reach both sides: {experts}"
    for step, (expert, moved) in enumerate(watched.changed):
        assert moved == {expert}, f"step {step + 1} trained {expert} but changed {moved}"
        sigmas = watched.sigmas[step]  # one micro-batch per step in this config
        if expert == "transformer":
            assert min(sigmas) >= BOUNDARY, (step, sigmas)
        else:
            assert max(sigmas) < BOUNDARY, (step, sigmas)

    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    assert [r["expert"] for r in records] == experts
    high, low = sorted(result.output_paths)
    assert (high.name, low.name) == ("lora_high_noise.safetensors", "lora_low_noise.safetensors")

    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(a14b)
    pipe.load_lora_weights(str(high))
    pipe.load_lora_weights(str(low), load_into_transformer_2=True)
    for name, module in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2)):
        loaded = lora_state_dict(module)
        trained = lora_state_dict(watched.models[name])
        assert loaded.keys() == trained.keys()
        for key in trained:
            torch.testing.assert_close(loaded[key].float(), trained[key].float().to(torch.bfloat16).float())


def test_training_one_expert_writes_only_its_file(a14b: Path, clip: Path, tmp_path: Path) -> None:
    config = _config(a14b, clip, tmp_path, max_steps=3, experts={"train": "LOW_NOISE"})
    result = Trainer(config).run()
    assert [p.name for p in result.output_paths] == ["lora_low_noise.safetensors"]
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    assert {r["expert"] for r in records} == {"transformer_2"}
    assert all(r["timestep"] < BOUNDARY * 1000 for r in records)


def test_a_boundary_setting_moves_the_split(a14b: Path, clip: Path, tmp_path: Path) -> None:
    config = _config(a14b, clip, tmp_path, max_steps=3, experts={"train": "HIGH_NOISE", "boundary": 0.5})
    Trainer(config).run()
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    assert all(500 <= r["timestep"] for r in records) and any(r["timestep"] < BOUNDARY * 1000 for r in records)


def test_expert_settings_on_a_one_transformer_model_are_refused(clip: Path, tmp_path: Path,
                                                                 tiny_model: Callable[[str], Path]) -> None:
    wan21 = tiny_model("wan21")
    for experts, key in (({"train": "HIGH_NOISE"}, "experts.train"), ({"boundary": 0.5}, "experts.boundary")):
        with pytest.raises(ConfigError) as info:
            Trainer(_config(wan21, clip, tmp_path, experts=experts)).run()
        assert info.value.key == key and key in str(info.value)


def test_a_timestep_range_that_misses_an_expert_is_refused(a14b: Path, clip: Path, tmp_path: Path) -> None:
    config = _config(a14b, clip, tmp_path, objective={"min_timestep": 0.0, "max_timestep": 0.5})
    with pytest.raises(ConfigError) as info:
        Trainer(config).run()
    assert info.value.key == "experts.train" and "LOW_NOISE" in str(info.value)


def test_routing_is_seeded_and_the_narrowed_ranges_meet_at_the_boundary() -> None:
    from core.models.base import Denoiser

    high, low = Denoiser("transformer", "high-noise expert", 0.875, 1.0), Denoiser("transformer_2", "low-noise expert", 0.0, 0.875)
    objective = {"timestep_distribution": "UNIFORM", "min_timestep": 0.0, "max_timestep": 1.0}
    picks = [route([high, low], objective, 7, step) for step in range(400)]
    assert picks == [route([high, low], objective, 7, step) for step in range(400)]
    share = picks.count(0) / len(picks)
    assert 0.07 < share < 0.19, f"uniform noise levels should pick the high expert about 12.5% of steps, not {share}"
    assert denoiser_objective(objective, high)["min_timestep"] == 0.875
    assert denoiser_objective(objective, low)["max_timestep"] < 0.875
    assert denoiser_objective(objective, Denoiser("transformer", "transformer", 0.0, 1.0)) is objective


def test_a_single_file_checkpoint_is_refused_for_two_experts(a14b: Path, clip: Path, tmp_path: Path) -> None:
    config = _config(a14b, clip, tmp_path, transformer={"model_path": str(tmp_path / "high.safetensors")})
    with pytest.raises(ConfigError) as info:
        Trainer(config).run()
    assert info.value.key == "transformer.model_path"


@pytest.fixture(scope="module")
def a14b_i2v(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan22_a14b_i2v")


def test_image_to_video_experts_learn_from_the_first_frame(a14b_i2v: Path, clip: Path, tmp_path: Path,
                                                           watched: _Watch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wan 2.2 A14B I2V: the same routing at its own boundary (0.9), and every prediction sees the
    clip's first-frame latents as WanImageToVideoPipeline passes them (mask + image latents)."""
    from core.models.wan import WanAdapter

    conditions: list[tuple[int, ...]] = []
    predict = WanAdapter.predict

    def spy(self: WanAdapter, transformer: Any, noisy: Any, sigmas: Any, batch: Any, **kwargs: Any) -> Any:
        conditions.append(tuple(kwargs["condition"].shape))
        return predict(self, transformer, noisy, sigmas, batch, **kwargs)

    monkeypatch.setattr(WanAdapter, "predict", spy)
    result = Trainer(_config(a14b_i2v, clip, tmp_path, max_steps=10)).run()
    assert result.steps == 10
    assert len(set(conditions)) == 1 and conditions[0][1] == 16, conditions  # the image latents, 16 channels
    for step, (expert, moved) in enumerate(watched.changed):
        assert moved == {expert}, f"step {step + 1} trained {expert} but changed {moved}"
        sigmas = watched.sigmas[step]
        assert (min(sigmas) >= 0.9) if expert == "transformer" else (max(sigmas) < 0.9), (step, expert, sigmas)

    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(a14b_i2v)
    for path in result.output_paths:
        pipe.load_lora_weights(str(path), load_into_transformer_2=path.name.endswith("_low_noise.safetensors"))
    assert lora_state_dict(pipe.transformer) and lora_state_dict(pipe.transformer_2)


def test_the_image_condition_reaches_the_model(a14b_i2v: Path) -> None:
    from core.models.wan import WanAdapter

    adapter = WanAdapter(a14b_i2v)
    adapter.load_vae("cpu", torch.float32)
    frames = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cached = adapter.encode_video(frames)
    latents, condition = adapter.split_latents(cached)
    assert latents.shape == condition.shape == (1, 16, 2, 4, 4)
    # The condition is the first picture's latents: another first picture, another condition; the
    # frames after it do not count.
    later = frames.clone()
    later[:, :, 1:] = 0
    assert torch.allclose(adapter.split_latents(adapter.encode_video(later))[1], condition, atol=1e-5)

    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    batch = {"prompt_embeds": torch.randn(1, 8, transformer.config.text_dim, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        one = adapter.predict(transformer, latents, torch.tensor([0.95]), batch, condition=condition)
        other = adapter.predict(transformer, latents, torch.tensor([0.95]), batch, condition=condition + 1)
    assert one.shape == latents.shape and not torch.allclose(one, other)

    request = SampleRequest("a red square", width=32, height=32, frames=5, steps=2, guidance_scale=1.0, seed=0)
    args = {"device": "cpu", "dtype": torch.float32}
    from core.errors import UserError

    with pytest.raises(UserError, match="needs an image"):
        adapter.sample({"transformer": transformer}, request, **args)
    image = torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()
    video = adapter.sample({"transformer": transformer}, dataclasses.replace(request, image=image), **args)
    assert video.shape == (5, 32, 32, 3)
