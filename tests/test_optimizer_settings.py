"""optimizer_settings reach the optimizers that have them, and offset noise is what its help says."""

from __future__ import annotations

import pytest
import torch

from core.config import resolve
from core.train.draws import sample_noise
from core.train.optim import build_optimizer

SETTINGS = {"weight_decay": 0.05, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "momentum": 0.5}


def _groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.zeros(4))]}]


@pytest.mark.parametrize("name, expected", [
    ("ADAMW", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("ADAMW_8BIT", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("PRODIGY", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("ADAFACTOR", {"weight_decay": 0.05}),
    ("SGD", {"momentum": 0.5, "weight_decay": 0.05}),
])
def test_each_optimizer_takes_the_settings_it_has(name: str, expected: dict) -> None:
    group = build_optimizer(name, _groups(), 1e-3, SETTINGS).param_groups[0]
    assert {key: group[key] for key in expected} == expected


def test_the_defaults_are_the_schemas() -> None:
    defaults = resolve({})["optimizer_settings"]
    group = build_optimizer("ADAMW", _groups(), 1e-3, defaults).param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.01)
    assert build_optimizer("ADAMW", _groups(), 1e-3).param_groups[0]["weight_decay"] == 0.01  # none given: the same


def test_the_trainer_builds_its_optimizer_from_the_settings(monkeypatch: pytest.MonkeyPatch, tiny_model, tmp_path) -> None:
    import core.train.optim as optim
    from media_factory import make_clip

    from core.train.trainer import Trainer

    seen: list[dict] = []
    real = optim.build_optimizer
    monkeypatch.setattr(optim, "build_optimizer", lambda *args: seen.append(args[3]) or real(*args))
    data = tmp_path / "data"
    data.mkdir()
    make_clip(data / "clip.mp4", width=32, height=32, fps=16, seconds=0.5)
    (data / "clip.txt").write_text("a clip", encoding="utf-8")
    config = resolve({"base_model": str(tiny_model("wan21")), "datasets": [{"path": str(data)}], "resolution": 32,
                      "frames": 5, "train_dtype": "FLOAT_32", "transformer": {"weight_dtype": "FLOAT_32"},
                      "workspace_dir": str(tmp_path / "ws"), "cache_dir": str(tmp_path / "cache"),
                      "output_path": str(tmp_path / "out.safetensors"), "max_steps": 1, "dataloader_threads": 0,
                      "sampling": {"every_n_steps": 0}, "backup": {"every_n_steps": 0},
                      "optimizer_settings": {"beta2": 0.95}})
    assert Trainer(config).run().steps == 1
    assert seen and seen[0]["beta2"] == 0.95


def test_offset_noise_is_one_draw_per_channel_added_to_the_plain_noise() -> None:
    shape, positions = (2, 4, 3, 5, 6), [0, 1]
    plain = {"timestep_distribution": "UNIFORM"}
    sigmas, noise = sample_noise(shape, positions, 7, 3, plain)
    offset_sigmas, offset_noise = sample_noise(shape, positions, 7, 3, {**plain, "offset_noise_weight": 0.1})
    assert torch.equal(sigmas, offset_sigmas)  # drawn before: unchanged
    offset = offset_noise - noise
    # The same over every frame and pixel of a channel, different between channels and samples.
    assert torch.allclose(offset, offset[:, :, :1, :1, :1].expand_as(offset), atol=1e-6)
    per_channel = offset[:, :, 0, 0, 0]
    assert per_channel.unique().numel() == per_channel.numel()
    # 0.1 times a standard normal: a weight of 0.1 over 8 draws stays well inside (0, 0.1 * 5).
    assert 0 < per_channel.abs().max() < 0.5
    # Without the setting nothing is drawn for it: the noise is what it always was.
    assert torch.equal(sample_noise(shape, positions, 7, 3, {**plain, "offset_noise_weight": 0.0})[1], noise)


def test_a_dora_lora_loads_into_the_pipeline_as_it_trained(tiny_model, tmp_path) -> None:
    """lora.decompose: peft's DoRA over NFLOAT_4 weights; the DIFFUSERS file carries the magnitudes, and the
    pipeline's load_lora_weights makes a DoRA adapter of it that changes the transformer's output."""
    from media_factory import make_clip
    from diffusers import WanPipeline

    from core.train.trainer import Trainer

    data = tmp_path / "data"
    data.mkdir()
    make_clip(data / "clip.mp4", width=32, height=32, fps=16, seconds=0.5)
    (data / "clip.txt").write_text("a clip", encoding="utf-8")
    model = tiny_model("wan21")
    config = resolve({"base_model": str(model), "datasets": [{"path": str(data)}], "resolution": 32, "frames": 5,
                      "train_dtype": "FLOAT_32", "transformer": {"weight_dtype": "NFLOAT_4"},
                      "workspace_dir": str(tmp_path / "ws"), "cache_dir": str(tmp_path / "cache"),
                      "output_path": str(tmp_path / "dora.safetensors"), "max_steps": 3, "learning_rate": 0.01,
                      "dataloader_threads": 0, "sampling": {"every_n_steps": 0}, "backup": {"every_n_steps": 0},
                      "lora": {"decompose": True}})
    (path,) = Trainer(config).run().output_paths  # NFLOAT_4's bitsandbytes weights: peft's DoRA reads them
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert any(k.endswith("lora_magnitude_vector") for k in f.keys())
    pipe = WanPipeline.from_pretrained(model)
    x, text, t = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 512, 32), torch.tensor([500.0])
    with torch.no_grad():
        before = pipe.transformer(x, t, text, return_dict=False)[0]
        pipe.load_lora_weights(str(path))
        after = pipe.transformer(x, t, text, return_dict=False)[0]
    assert pipe.transformer.peft_config["default_0"].use_dora
    assert not torch.allclose(before, after, atol=1e-5)
