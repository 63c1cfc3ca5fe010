"""HunyuanVideo-I2V: HunyuanVideoImageToVideoPipeline folders, on the tiny model (core/models/tiny/hunyuan.py):
the Llava text encoder reading the first frame, the image conditioning of both condition types as the
pipeline builds it, training through the preset, and the LoRA in the I2V pipeline."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from media_factory import make_clip

from core.config import resolve
from core.errors import ConfigError
from core.models.hunyuan_video import HunyuanVideoAdapter
from core.models.registry import adapter_for
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PRESET = "#hunyuan video I2V LoRA"


@pytest.fixture(scope="module")
def i2v(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hunyuan_video_i2v")


@pytest.fixture(scope="module")
def concat(i2v: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny I2V folder with a latent_concat transformer (HunyuanVideo-I2V-33ch's layout: 33 channels)."""
    from core.models.tiny.hunyuan import _transformer

    folder = tmp_path_factory.mktemp("i2v-33ch") / "model"
    shutil.copytree(i2v, folder)
    shutil.rmtree(folder / "transformer")
    _transformer(0, in_channels=33, image_condition_type="latent_concat").save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("one-clip")
    make_clip(folder / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (folder / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    return folder


def _loaded(folder: Path) -> HunyuanVideoAdapter:
    adapter = adapter_for({"base_model": str(folder), "model_type": "AUTO"})
    assert isinstance(adapter, HunyuanVideoAdapter)
    return adapter


def test_the_i2v_folder_is_detected_and_a_text_to_video_one_refused(i2v: Path, tiny_model: Callable[[str], Path]) -> None:
    adapter = _loaded(i2v)
    assert adapter.family == "hunyuan_video_i2v" and adapter.image_conditioned and adapter.text_takes_image
    assert adapter.condition_type == "token_replace" and adapter.training_methods == ("LORA",)
    assert adapter_for({"base_model": str(i2v), "model_type": "HUNYUAN_VIDEO_I2V"}).family == "hunyuan_video_i2v"
    with pytest.raises(ConfigError, match="HunyuanVideo model; set model_type to AUTO or HUNYUAN_VIDEO,"):
        adapter_for({"base_model": str(tiny_model("hunyuan_video")), "model_type": "HUNYUAN_VIDEO_I2V"})
    assert not _loaded(tiny_model("hunyuan_video")).image_conditioned


def _record(module: torch.nn.Module) -> list[dict]:
    """The keywords of every call of module.forward, from now on."""
    calls: list[dict] = []

    def hook(_module, _args, kwargs):  # noqa: ANN001, ANN202
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("layout", ["token_replace", "latent_concat"])
def test_conditioning_and_prompt_are_the_pipelines_own(i2v: Path, concat: Path, layout: str) -> None:
    """The I2V pipeline's first transformer call (its prepare_latents, its encode_prompt with the image)
    against the adapter's encode_video / split_latents / encode_text / predict on the same frame."""
    from diffusers import HunyuanVideoImageToVideoPipeline
    from PIL import Image

    folder = i2v if layout == "token_replace" else concat
    adapter = _loaded(folder)
    assert adapter.condition_type == layout
    frames = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = ((frames[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    frames[:, :, 0] = torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1  # the frame as its uint8 pixels

    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = _record(pipe.transformer)
    caption = "a red ball rolling on the floor"
    with torch.no_grad():
        pipe(image=Image.fromarray(first), prompt=caption, height=32, width=48, num_frames=9, num_inference_steps=1,
             guidance_scale=6.0, generator=torch.Generator().manual_seed(1), output_type="latent")
    (call,) = calls

    adapter.load_vae("cpu", torch.float32)
    for name in adapter.text_encoder_names:
        adapter.load_text_encoder("cpu", torch.float32, name=name)
    video, condition = adapter.split_latents(adapter.encode_video(frames, torch.Generator().manual_seed(2)))
    text = adapter.encode_text([caption], images=[first])
    mask = text["prompt_attention_mask"]
    torch.testing.assert_close(mask.float(), call["encoder_attention_mask"])
    torch.testing.assert_close(text["prompt_embeds"][mask], call["encoder_hidden_states"][mask])
    torch.testing.assert_close(text["pooled_projections"], call["pooled_projections"])

    hidden = call["hidden_states"]
    if layout == "token_replace":
        # [image latents, noisy frames 1:]: the noisy part is what training learns (split_latents drops frame 0).
        assert video.shape == (1, 16, 2, 4, 6) and hidden.shape == (1, 16, 3, 4, 6)
        torch.testing.assert_close(condition, hidden[:, :, :1])
        noisy = hidden[:, :, 1:]
    else:
        # [noisy, image latents on frame 0 then zeros, mask]: every frame is learned.
        assert video.shape == (1, 16, 3, 4, 6) and hidden.shape == (1, 33, 3, 4, 6)
        torch.testing.assert_close(condition, hidden[:, 16:32, :1])
        assert not hidden[:, 16:32, 1:].any()
        noisy = hidden[:, :16]
    calls.clear()
    sigma = call["timestep"] / 1000.0
    out = adapter.predict(pipe.transformer, noisy, sigma, text, condition=condition)
    torch.testing.assert_close(calls[0]["hidden_states"], hidden)
    torch.testing.assert_close(calls[0]["guidance"], call["guidance"] / 6.0)  # training's guidance 1.0, the pipeline's 6.0
    assert out.shape == noisy.shape
    with pytest.raises(ValueError, match="one image per caption"):
        adapter.encode_text([caption])


def _i2v_config(model: Path, data: Path, root: Path, **overrides) -> dict:
    overlay = {
        "training_method": "LORA", "model_type": "HUNYUAN_VIDEO_I2V", "base_model": str(model), "train_dtype": "FLOAT_32",
        "transformer": {"train": True, "weight_dtype": "FLOAT_32"},
        "text_encoder": {"train": False, "weight_dtype": "FLOAT_32"},
        "text_encoder_2": {"train": False, "weight_dtype": "FLOAT_32"}, "vae": {"weight_dtype": "FLOAT_32"},
        "gradient_checkpointing": "OFF", "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(root / "workspace"), "cache_dir": str(root / "cache"),
        "output_path": str(root / "out" / "lora.safetensors"), "resolution": 64, "frames": 9,
        "video_config": {"max_frames": 9, "target_fps": 16.0}, "lora": {"rank": 8, "alpha": 8.0},
        "sampling": {"every_n_steps": 0}, "backup": {"every_n_steps": 0}, "validation": {"every_n_steps": 0},
        "dataloader_threads": 0, "warmup_steps": 0, "max_steps": 3,
    }
    config = resolve(overlay)
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def test_lora_trains_loss_falls_and_loads_into_the_i2v_pipeline(i2v: Path, one_clip: Path, tmp_path: Path) -> None:
    from diffusers import HunyuanVideoImageToVideoPipeline
    from PIL import Image

    config = _i2v_config(i2v, one_clip, tmp_path, max_steps=40, learning_rate=0.003, lora={"rank": 16, "alpha": 16.0})
    result = Trainer(config).run()
    assert result.steps == 40
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    first, last = (sum(r["loss"] for r in part) / 10 for part in (records[:10], records[-10:]))
    assert last < 0.95 * first, (first, last)
    # One text entry per clip variant: the caption read with that variant's first frame.
    assert len(list((tmp_path / "cache" / "text").rglob("*.safetensors"))) >= 1

    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(i2v)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))

    def run() -> np.ndarray:
        return pipe(image=image, prompt="a square moving across the frame", height=32, width=48, num_frames=5,
                    num_inference_steps=2, guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    before = run()
    pipe.load_lora_weights(str(result.output_paths[0]))
    after = run()
    assert np.abs(after - before).max() > 1e-3


def test_the_i2v_preset_trains_the_tiny_model_through_main_with_only_model_data_and_output_changed(
        i2v: Path, one_clip: Path, tmp_path: Path) -> None:
    """`main.py train --preset` on the repeated clip, with only the model, data and output changed (and
    where files go and the run's length: 10 steps, no warmup, as its 50 warmup steps would leave the
    learning rate near 0 throughout): the loss falls below what the same seeded draws of noise and noise
    level give with learning_rate 0 (the baseline run, the only other change)."""
    from conftest import run_main

    from core.config import list_presets, load_preset

    info = {p.name: p for p in list_presets()}[PRESET]
    assert info.bundled and info.error is None and "image-to-video checkpoint" in info.description
    loaded = load_preset(PRESET)
    assert loaded["model_type"] == "HUNYUAN_VIDEO_I2V" and loaded["base_model"] == "hunyuanvideo-community/HunyuanVideo-I2V"
    dataset = json.dumps([{"path": str(one_clip), "repeats": 1}])
    losses = {}
    for run, extra in (("trained", []), ("baseline", ["--set", "learning_rate=0"])):
        output = tmp_path / run / "lora.safetensors"
        done = run_main("train", "--preset", PRESET, "--set", f"base_model={i2v}", "--set", f"datasets={dataset}",
                        "--set", f"output_path={output}", "--set", f"workspace_dir={tmp_path / run / 'workspace'}",
                        "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "max_steps=10", "--set", "warmup_steps=0", "--set", "dataloader_threads=0",
                        "--set", "sampling.every_n_steps=0", "--set", "backup.every_n_steps=0", *extra, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert output.is_file()
        records = read_metrics(tmp_path / run / "workspace" / "metrics.jsonl")
        losses[run] = [r["loss"] for r in records]
    assert len(losses["trained"]) == len(losses["baseline"]) == 10
    assert losses["trained"][0] == pytest.approx(losses["baseline"][0], rel=1e-5)  # the same first step
    late = {run: sum(values[5:]) for run, values in losses.items()}
    # float32 losses of about 4.6 round at 5e-7; the LoRA moves them by far more.
    assert late["trained"] < late["baseline"] - 1e-4, late


def test_the_i2v_preset_fits_24_gb_by_the_estimate() -> None:
    from core.config import load_preset
    from core.memory.estimate import GIB, estimate_memory

    estimate = estimate_memory(load_preset(PRESET))
    assert estimate.fits(24 * GIB) and estimate.phase == "training"
    parts = {p["name"]: p for p in estimate.details["parts"]}
    assert parts["text_encoder"]["kind"] == "llava" and parts["text_encoder"]["weight_dtype"] == "FLOAT_8"


def test_each_clip_variant_caches_the_caption_read_with_its_own_first_frame(i2v: Path, tmp_path: Path) -> None:
    """Two variants of one clip (random windows) start on different frames: two text entries, each the
    Llava's reading of the caption with that variant's first frame, and the dataset gives each variant its own."""
    from core.data.cache import ContentHasher
    from core.data.dataset import CachedSampleDataset
    from core.data.plan import plan_data
    from core.data.precompute import fill_caches, sample_pixels

    data = tmp_path / "data"
    data.mkdir()
    make_clip(data / "clip.mp4", width=64, height=64, fps=16, seconds=2.0)
    (data / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    config = _i2v_config(i2v, data, tmp_path, cache_variants=2, video_config={"temporal_augmentation": True, "max_frames": 32})
    adapter = adapter_for(config)
    plan = plan_data(config, adapter, ContentHasher(config["cache_dir"]))
    (sample,) = plan.train
    assert len(sample.plans) == 2 and sample.plans[0] != sample.plans[1]
    assert len(set(sample.text_keys)) == 2 and sample.text_key == sample.text_keys[0]
    report = fill_caches(plan, adapter, config["cache_dir"])
    assert report.texts_computed == 2 and report.latents_computed == 2
    dataset = CachedSampleDataset({0: sample.cached}, config["cache_dir"])
    for name in adapter.text_encoder_names:
        adapter.load_text_encoder("cpu", torch.float32, name=name)
    for variant, frame_plan in enumerate(sample.plans):
        first = sample_pixels(sample, frame_plan)[0]
        expected = adapter.encode_text([sample.item.caption], images=[first])
        entry = dataset.load(0, variant)
        mask = expected["prompt_attention_mask"][0]
        stored = entry["prompt_embeds"]
        torch.testing.assert_close(stored, expected["prompt_embeds"][0][: stored.shape[0]])
        assert int(mask.sum()) == stored.shape[0]
    # The two first frames differ, and so do the two readings of the one caption.
    assert not torch.equal(dataset.load(0, 0)["prompt_embeds"], dataset.load(0, 1)["prompt_embeds"])
    # Cached again: nothing computed.
    assert fill_caches(plan_data(config, adapter, ContentHasher(config["cache_dir"])), adapter, config["cache_dir"]).texts_reused == 2


def test_samples_start_from_the_image_with_the_i2v_pipeline(i2v: Path) -> None:
    from core.models.base import SampleRequest

    adapter = _loaded(i2v)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    image = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    request = SampleRequest("a red ball", 48, 32, 5, 2, 6.0, 0, image=image)
    video = adapter.sample({"transformer": transformer}, request, device="cpu", dtype=torch.float32)
    assert video.shape == (5, 32, 48, 3) and video.dtype == np.uint8
    with pytest.raises(ValueError, match="needs request.image"):
        adapter.sample({"transformer": transformer}, SampleRequest("a red ball", 48, 32, 5, 2, 6.0, 0), device="cpu", dtype=torch.float32)


def test_caption_dropout_is_refused_by_name_where_the_text_reads_the_first_frame(i2v: Path, tmp_path: Path) -> None:
    """The Llava reads each clip's first frame with its caption, so no one empty-caption entry can
    stand in for a dropped caption: the plan refuses caption_dropout, naming the key."""
    from core.data.cache import ContentHasher
    from core.data.plan import plan_data
    from core.errors import ConfigError

    data = tmp_path / "data"
    data.mkdir()
    make_clip(data / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (data / "clip.txt").write_text("a square", encoding="utf-8")
    config = _i2v_config(i2v, data, tmp_path, datasets=[{"path": str(data), "repeats": 1, "caption_dropout": 0.5}])
    config["datasets"] = [resolve({"datasets": config["datasets"]})["datasets"][0]]
    with pytest.raises(ConfigError, match="caption_dropout") as refused:
        plan_data(config, adapter_for(config), ContentHasher(config["cache_dir"]))
    assert refused.value.key == "datasets.caption_dropout"
