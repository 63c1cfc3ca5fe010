"""CogVideoX image-to-video (the 5b-I2V and 1.5-I2V layouts) and 1.5's time padding, on the tiny models.

What is pinned against diffusers' own code: the image latents are CogVideoXImageToVideoPipeline.prepare_latents'
(a posterior sample of the first frame, times the scaling factor, or divided by it where the VAE says
invert_scale_latents); the transformer gets them after the noisy latents on the channel axis,
padded with zero frames, and 1.5-I2V its ofs of 2.0; 1.5's first latent frame is repeated in front,
as CogVideo's trainers do; the 5b-I2V takes its one frame size only. Then a LoRA trains on each
through the real Trainer and loads into the I2V pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from media_factory import make_clip

from core.config import resolve
from core.errors import ConfigError
from core.models.cogvideox import CogVideoXAdapter
from core.models.registry import adapter_for, detect_family
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer


@pytest.fixture(scope="module")
def i2v(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("cogvideox_i2v")


@pytest.fixture(scope="module")
def i2v_1_5(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("cogvideox15_i2v")


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("one-clip")
    make_clip(folder / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (folder / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    return folder


def _loaded(folder: Path) -> CogVideoXAdapter:
    adapter = adapter_for({"base_model": str(folder), "model_type": "AUTO"})
    assert isinstance(adapter, CogVideoXAdapter)
    return adapter


def i2v_config(model: Path, data: Path, root: Path, **overrides) -> dict:
    overlay = {
        "training_method": "LORA", "base_model": str(model), "train_dtype": "FLOAT_32",
        "transformer": {"train": True, "weight_dtype": "FLOAT_32"},
        "text_encoder": {"train": False, "weight_dtype": "FLOAT_32"}, "vae": {"weight_dtype": "FLOAT_32"},
        "gradient_checkpointing": "OFF", "objective": {"timestep_distribution": "UNIFORM", "loss_weighting": "SNR"},
        "datasets": [{"path": str(data), "repeats": 1}], "workspace_dir": str(root / "workspace"),
        "cache_dir": str(root / "cache"), "output_path": str(root / "out" / "lora.safetensors"),
        "resolution": 64, "frames": 9, "video_config": {"max_frames": 9, "target_fps": 16.0},
        "lora": {"rank": 8, "alpha": 8.0}, "sampling": {"every_n_steps": 0}, "backup": {"every_n_steps": 0},
        "validation": {"every_n_steps": 0}, "dataloader_threads": 0, "warmup_steps": 0, "max_steps": 3,
    }
    config = resolve(overlay)
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def test_the_families_and_their_sizes(i2v: Path, i2v_1_5: Path, tiny_model: Callable[[str], Path]) -> None:
    for folder in (i2v, i2v_1_5):
        assert detect_family(folder) == "cogvideox_i2v"
        adapter = _loaded(folder)
        assert adapter.family == "cogvideox_i2v" and adapter.image_conditioned
        assert adapter_for({"base_model": str(folder), "model_type": "COGVIDEOX_I2V"}).family == "cogvideox_i2v"
    # The 5b-I2V learned its positional embeddings at sample_height x sample_width cells: one size only.
    assert _loaded(i2v).fixed_size == (64, 64) and _loaded(i2v_1_5).fixed_size is None
    with pytest.raises(ConfigError, match="CogVideoX image-to-video model; set model_type to AUTO or COGVIDEOX_I2V"):
        adapter_for({"base_model": str(i2v), "model_type": "COGVIDEOX"})
    text_only = _loaded(tiny_model("cogvideox15"))
    assert text_only.family == "cogvideox" and not text_only.image_conditioned


def test_every_variant_takes_8k_plus_1_frames_and_1_5_pads_its_first_latent_frame(tiny_model: Callable[[str], Path]) -> None:
    """The VAE round-trips 8k + 1 frames only; 1.5's transformer gets the first latent frame twice (CogVideo's trainers)."""
    for family in ("cogvideox", "cogvideox_i2v", "cogvideox15", "cogvideox15_i2v"):
        assert [n for n in range(1, 30) if _loaded(tiny_model(family)).frame_rule.accepts(n)] == [1, 9, 17, 25], family
    adapter = _loaded(tiny_model("cogvideox15"))
    vae = adapter.load_vae("cpu", torch.float32)
    frames = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    decoded = vae.decode(vae.encode(frames).latent_dist.mode()).sample
    assert decoded.shape[2] == 9  # 9 -> 3 latent frames -> 9
    latents = adapter.encode_video(frames, torch.Generator().manual_seed(3))
    plain = vae.encode(frames).latent_dist.sample(generator=torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    assert latents.shape == (1, 16, 4, 4, 4) and adapter.latent_frames(9) == 4
    torch.testing.assert_close(latents, torch.cat([plain[:, :, :1], plain], dim=2).float())
    assert _loaded(tiny_model("cogvideox")).latent_frames(9) == 3  # no temporal patch, no padding


@pytest.mark.parametrize("family", ["cogvideox_i2v", "cogvideox15_i2v"])
def test_image_latents_are_the_pipelines(tiny_model: Callable[[str], Path], family: str) -> None:
    from diffusers import CogVideoXImageToVideoPipeline

    folder = tiny_model(family)
    adapter = _loaded(folder)
    vae = adapter.load_vae("cpu", torch.float32)
    frames = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cached = adapter.encode_video(frames, torch.Generator().manual_seed(3))
    video, image = adapter.split_latents(cached)
    assert video.shape == (1, 16, adapter.latent_frames(9), 8, 8) and image.shape == (1, 16, 1, 8, 8)
    # The pipeline's own image latents, drawn from a generator in the state ours had after the video's draw.
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder)
    generator = torch.Generator().manual_seed(3)
    vae.encode(frames).latent_dist.sample(generator=generator)
    _, theirs = pipe.prepare_latents(frames[:, :, 0], 1, 16, 9, 64, 64, torch.float32, "cpu", generator)
    torch.testing.assert_close(image[:, :, 0], theirs[:, 0])
    assert bool(vae.config.invert_scale_latents) == (family == "cogvideox15_i2v")  # 1.5 divides by the scale


class _Spy(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []
        self.config, self.patch_embed = inner.config, inner.patch_embed

    def forward(self, **kwargs):  # noqa: ANN003, ANN201 - the transformer's keywords
        self.calls.append(kwargs)
        return self.inner(**kwargs)


@pytest.mark.parametrize("family, ofs", [("cogvideox_i2v", None), ("cogvideox15_i2v", 2.0)])
def test_predict_feeds_the_image_as_the_pipeline_does(tiny_model: Callable[[str], Path], family: str, ofs: float | None) -> None:
    adapter = _loaded(tiny_model(family))
    spy = _Spy(adapter.load_transformer("transformer", "cpu", torch.float32))
    noisy, image = torch.randn(2, 16, 4, 8, 8), torch.randn(2, 16, 1, 8, 8)
    out = adapter.predict(spy, noisy, torch.tensor([0.2, 0.9]), {"prompt_embeds": torch.zeros(2, 226, 32)}, condition=image)
    (call,) = spy.calls
    hidden = call["hidden_states"]
    # CogVideoXImageToVideoPipeline: cat([latents, image_latents], dim=2) in (B, F, C, H, W), the image
    # latents being the image's frame followed by zero frames.
    assert hidden.shape == (2, 4, 32, 8, 8)
    torch.testing.assert_close(hidden[:, :, :16], noisy.permute(0, 2, 1, 3, 4))
    torch.testing.assert_close(hidden[:, 0, 16:], image[:, :, 0])
    assert not hidden[:, 1:, 16:].any()
    assert (call["ofs"] is None) if ofs is None else call["ofs"].tolist() == [ofs, ofs]
    assert out.shape == noisy.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="needs the image latents"):
        adapter.predict(spy, noisy, torch.tensor([0.2, 0.9]), {"prompt_embeds": torch.zeros(2, 226, 32)})


@pytest.mark.parametrize("family", ["cogvideox_i2v", "cogvideox15_i2v"])
def test_lora_trains_loss_falls_and_loads_into_the_i2v_pipeline(tiny_model: Callable[[str], Path], one_clip: Path,
                                                                 tmp_path: Path, family: str) -> None:
    folder = tiny_model(family)
    config = i2v_config(folder, one_clip, tmp_path, max_steps=40, learning_rate=0.003, lora={"rank": 16, "alpha": 16.0})
    result = Trainer(config).run()
    assert result.steps == 40
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    first, last = (sum(r["loss"] for r in part) / 10 for part in (records[:10], records[-10:]))
    assert last < 0.95 * first, (first, last)

    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder)
    x = torch.randn(1, 2, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 226, 32, generator=torch.Generator().manual_seed(1))
    ofs = None if pipe.transformer.config.ofs_embed_dim is None else torch.tensor([2.0])
    rotary = pipe._prepare_rotary_positional_embeddings(64, 64, 2, torch.device("cpu"))
    with torch.no_grad():
        before = pipe.transformer(x, text, torch.tensor([500]), ofs=ofs, image_rotary_emb=rotary, return_dict=False)[0]
        pipe.load_lora_weights(str(result.output_paths[0]))
        after = pipe.transformer(x, text, torch.tensor([500]), ofs=ofs, image_rotary_emb=rotary, return_dict=False)[0]
    assert not torch.allclose(before, after, atol=1e-5)


def test_the_fixed_size_model_trains_every_clip_at_its_size_and_samples_from_the_first_frame(i2v: Path, tmp_path: Path) -> None:
    """A landscape and a portrait clip both train at the 5b-I2V layout's one size; samples start from a frame."""
    data = tmp_path / "clips"
    data.mkdir()
    make_clip(data / "wide.mp4", width=96, height=64, fps=16, seconds=1.0)
    make_clip(data / "tall.mp4", width=48, height=80, fps=16, seconds=1.0)
    for stem in ("wide", "tall"):
        (data / f"{stem}.txt").write_text(f"a {stem} clip", encoding="utf-8")
    sampling = {"every_n_steps": 2, "prompts": ["a cat"], "width": 64, "height": 64, "frames": 9, "inference_steps": 2}
    config = i2v_config(i2v, data, tmp_path, resolution=128, max_steps=2, sampling=sampling)
    logs: list[str] = []
    from core.train.events import TrainerCallbacks

    class Logs(TrainerCallbacks):
        def on_log(self, level: int, message: str) -> None:
            logs.append(message)

    result = Trainer(config, Logs()).run()
    assert result.steps == 2
    assert any("64x64 pixels only" in line and "resolution is not used" in line for line in logs)
    from core.data.buckets import Bucket
    from core.data.cache import ContentHasher
    from core.data.plan import plan_data

    plan = plan_data(config, _loaded(i2v), ContentHasher(config["cache_dir"]))
    assert {s.item.path.name: s.bucket for s in plan.train} == {"wide.mp4": Bucket(9, 64, 64), "tall.mp4": Bucket(9, 64, 64)}
    assert list((tmp_path / "workspace" / "samples").glob("step-000002-*.mp4"))
    # A sample size other than the model's own is refused by name before anything loads.
    wrong = i2v_config(i2v, data, tmp_path / "again", sampling={**sampling, "width": 96})
    with pytest.raises(ConfigError, match="sampling.width 96: CogVideoX image-to-video makes videos of 64x64") as caught:
        Trainer(wrong).run()
    assert caught.value.key == "sampling.width"


PRESET = "#cogvideox I2V LoRA"


@pytest.mark.parametrize("family", ["cogvideox_i2v", "cogvideox15_i2v"])
def test_the_i2v_preset_trains_the_tiny_models_with_only_model_data_and_output_changed(
        tiny_model: Callable[[str], Path], one_clip: Path, tmp_path: Path, family: str) -> None:
    from core.config import list_presets, load_preset

    info = {p.name: p for p in list_presets()}[PRESET]
    assert info.bundled and info.error is None and info.description
    loaded = load_preset(PRESET)
    assert loaded["model_type"] == "COGVIDEOX_I2V" and loaded["base_model"] == "THUDM/CogVideoX-5b-I2V"
    assert loaded["objective"]["timestep_distribution"] == "UNIFORM" and loaded["objective"]["loss_weighting"] == "SNR"
    output = tmp_path / "out" / "lora.safetensors"
    config = resolve(dict(loaded), {
        "base_model": str(tiny_model(family)),
        "datasets": [{"path": str(one_clip), "repeats": 1}],
        "output_path": str(output),
        "workspace_dir": str(tmp_path / "workspace"),
        "cache_dir": str(tmp_path / "cache"),
        "dataloader_threads": 0,
        "max_steps": 2,
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 0},
    })
    result = Trainer(config).run()
    assert result.steps == 2 and result.final_loss is not None and result.output_paths == [output]
