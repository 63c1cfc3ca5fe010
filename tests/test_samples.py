"""Samples during training: mp4 files per prompt, from the model as it is now, training state untouched."""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.config.settings import defaults
from core.export.video_file import read_video_frames, write_mp4
from core.models.base import SampleRequest
from core.models.wan import WanAdapter
from core.train.samples import SampleMaker, sample_file_name, should_sample

SIZE = {"width": 32, "height": 32, "frames": 5, "inference_steps": 2, "guidance_scale": 2.0, "seed": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tiny_model: Callable[[str], Path]) -> dict[str, Path]:
    return {family: tiny_model(family) for family in ("wan21", "wan22_ti2v_5b", "wan22_a14b", "wan22_a14b_i2v")}


def _config(prompts: list[str], **sampling: Any) -> dict[str, Any]:
    config = defaults()
    config["sampling"].update({**SIZE, "every_n_steps": 10, "prompts": prompts, **sampling})
    config["video_config"]["target_fps"] = 16.0
    config["text_encoder"]["weight_dtype"] = "FLOAT_32"  # the encoder samples load, as the expected video's
    return config


def _training_denoisers(adapter: WanAdapter) -> dict[str, Any]:
    """The denoisers as a LoRA run holds them: LoRA added and trainable, base frozen, mixed train flags."""
    from peft import LoraConfig

    parts = {}
    for name in adapter.transformer_names():
        transformer = adapter.load_transformer(name, "cpu", torch.float32)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=adapter.default_lora_targets()))
        for param_name, param in transformer.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=0.5, generator=torch.Generator().manual_seed(1))
        transformer.train()
        next(iter(transformer.blocks)).eval()  # a submodule in another mode than its parent must stay so
        parts[name] = transformer
    return parts


def _state(parts: dict[str, Any]) -> dict[str, Any]:
    return {
        "params": {f"{n}.{k}": v.detach().clone() for n, m in parts.items() for k, v in m.state_dict().items()},
        "training": {f"{n}.{k}": m.training for n, p in parts.items() for k, m in p.named_modules()},
        "requires_grad": {f"{n}.{k}": v.requires_grad for n, m in parts.items() for k, v in m.named_parameters()},
        "grads": {f"{n}.{k}": v.grad for n, m in parts.items() for k, v in m.named_parameters()},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["params"].keys() == after["params"].keys()
    assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"]), "parameters changed"
    assert before["training"] == after["training"], "train/eval flags changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad flags changed"
    assert all(g is None for g in after["grads"].values()), "sampling left gradients"
    assert torch.equal(before["torch_rng"], after["torch_rng"]), "the torch RNG state moved"
    assert (before["numpy_rng"] == after["numpy_rng"]).all() and before["python_rng"] == after["python_rng"]


def test_file_names_carry_step_and_prompt_and_are_safe_everywhere() -> None:
    assert sample_file_name(250, 0, "A cat walking") == "step-000250-0-a-cat-walking.mp4"
    hostile = ['a <cat>: "walks" / \\ on | the * roof?', "CON", "..", "  . ", "猫が歩く", "é" * 500, "a\nb\tc\x00d"]
    names = [sample_file_name(7, i, p) for i, p in enumerate(hostile)]
    for name in names:
        assert re.fullmatch(r"step-000007-\d+-[a-z0-9]+(-[a-z0-9]+)*\.mp4", name), name
        assert len(name) <= 80
    assert names[4] == "step-000007-4-prompt.mp4" and names[5].startswith("step-000007-5-eeee")
    assert len(set(names)) == len(names)


def test_should_sample_follows_the_settings() -> None:
    config = _config(["a cat"], every_n_steps=10)
    assert [s for s in range(31) if should_sample(s, config)] == [10, 20, 30]
    assert not should_sample(10, _config([], every_n_steps=10))
    assert not should_sample(10, _config(["a cat"], every_n_steps=0))


def test_mp4_round_trip_pads_odd_sizes_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import av

    video = np.tile(np.linspace(0, 255, 31, dtype=np.uint8)[None, None, :, None], (3, 17, 1, 3))
    path = write_mp4(tmp_path / "clip.mp4", video, 23.976)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert abs(float(stream.average_rate) - 23.976) < 1e-3
    back = read_video_frames(path)
    assert back.shape == (3, 18, 32, 3)  # padded to even by repeating the last row and column
    assert np.abs(back[:, :17, :31].astype(int) - video).mean() < 3
    assert np.abs(back[:, 17].astype(int) - back[:, 16]).max() < 8 and np.abs(back[:, :, 31].astype(int) - back[:, :, 30]).max() < 8

    def broken_replace(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_mp4(tmp_path / "other.mp4", video, 24.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


@pytest.mark.parametrize("family", ["wan21", "wan22_ti2v_5b", "wan22_a14b"])
def test_samples_are_written_per_prompt_and_training_state_is_untouched(models: dict[str, Path], tmp_path: Path,
                                                                        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = WanAdapter(models[family])
    parts = _training_denoisers(adapter)
    made: list[np.ndarray] = []
    real = adapter.sample
    monkeypatch.setattr(adapter, "sample", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    prompts = ["A red circle, moving left", "a blue square?"]
    seen: list[Path] = []
    maker = SampleMaker(adapter, _config(prompts), tmp_path, "cpu", torch.float32, on_sample=seen.append)
    torch.manual_seed(123)
    before = _state(parts)
    paths = maker.make(20, parts)
    _assert_same_state(before, _state(parts))
    assert adapter._vae is None and adapter.text_parts()["text_encoder"] == (None, None), "encoders loaded for sampling are dropped after"

    assert [p.name for p in paths] == ["step-000020-0-a-red-circle-moving-left.mp4", "step-000020-1-a-blue-square.mp4"]
    assert seen == paths and all(p.parent == tmp_path / "samples" for p in paths)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == sorted(p.name for p in paths)  # no temporary files
    # The video is the model's as it is now (the LoRA included), with the sampling settings.
    expected = real(parts, SampleRequest(prompts[0], width=32, height=32, frames=5, steps=2, guidance_scale=2.0, seed=3),
                    device="cpu", dtype=torch.float32)
    assert np.array_equal(made[0], expected)
    for path, video in zip(paths, made):
        # The file decodes to that video up to H.264's loss: compared with the same video written
        # anew, as the tiny models' noisy pictures lose much colour to yuv420p. Not bit-exact: at
        # sizes this tiny x264's output varies a little from run to run (from 128 px up it does not).
        decoded = read_video_frames(path)
        assert decoded.shape == video.shape == (5, 32, 32, 3)
        again = read_video_frames(write_mp4(tmp_path / "again.mp4", video, 16.0)).astype(int)
        assert np.abs(decoded - again).mean() < 6


def test_one_failing_sample_is_logged_and_the_others_are_written(models: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    adapter = WanAdapter(models["wan21"])
    parts = _training_denoisers(adapter)
    real = adapter.sample

    def misbehaving(denoisers: dict[str, Any], request: SampleRequest, **kwargs: Any) -> Any:
        # Draws from every global RNG and flips every mode before failing: all of it must be undone.
        torch.rand(3), np.random.rand(), random.random()
        for module in denoisers.values():
            module.eval().requires_grad_(False)
        if request.prompt == "explode":
            raise RuntimeError("the pipeline broke\nsecond line")
        if request.prompt == "too big":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(denoisers, request, **kwargs)

    monkeypatch.setattr(adapter, "sample", misbehaving)
    maker = SampleMaker(adapter, _config(["first", "explode", "too big", "last"]), tmp_path, "cpu", torch.float32)
    before = _state(parts)
    with caplog.at_level(logging.INFO, logger="core.train.samples"):
        paths = maker.make(30, parts)
    _assert_same_state(before, _state(parts))
    assert [p.name for p in paths] == ["step-000030-0-first.mp4", "step-000030-3-last.mp4"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "'explode'" in warnings[0] and "the pipeline broke" in warnings[0] and "second line" not in warnings[0]
    assert "'too big'" in warnings[1] and "out of memory" in warnings[1] and "sampling width" in warnings[1]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == "core.train.samples"]
    assert len(infos) == 2 and all("step 30" in m for m in infos)


def test_image_to_video_samples_need_the_first_frame(models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adapter = WanAdapter(models["wan22_a14b_i2v"])
    parts = _training_denoisers(adapter)
    maker = SampleMaker(adapter, _config(["a red square", "a blue one"]), tmp_path, "cpu", torch.float32)
    with caplog.at_level(logging.WARNING, logger="core.train.samples"):
        assert maker.make(10, parts) == []
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1 and "first frame" in records[0].getMessage()

    caplog.clear()
    maker.image = np.zeros((4, 4), np.uint8)  # not a picture: one warning, no samples, the run goes on
    with caplog.at_level(logging.WARNING, logger="core.train.samples"):
        assert maker.make(10, parts) == []
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1 and "(H, W, 3)" in records[0].getMessage()

    maker.config["sampling"]["prompts"] = ["a red square"]
    maker.image = torch.full((40, 24, 3), 200, dtype=torch.uint8)  # a training clip's first frame, any size
    before = _state(parts)
    [path] = maker.make(20, parts)
    _assert_same_state(before, _state(parts))
    assert path.name == "step-000020-0-a-red-square.mp4" and read_video_frames(path).shape == (5, 32, 32, 3)


def test_a_quantized_offloaded_checkpointed_denoiser_samples_and_stays_as_it_was(models: dict[str, Path], tmp_path: Path) -> None:
    # The denoiser as a low-memory run holds it: INT_8 weights, LoRA, gradient checkpointing and
    # half of its blocks streamed by the layer-offload conductor (device "cpu": the same code path).
    from peft import LoraConfig

    from core.memory.offload import BlockOffloader

    adapter = WanAdapter(models["wan21"])
    transformer = adapter.load_quantized_transformer("transformer", "INT_8", cache_dir=tmp_path / "cache")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=adapter.default_lora_targets()))
    transformer.enable_gradient_checkpointing()
    transformer.train()
    offloader = BlockOffloader(adapter.block_stacks(transformer), 0.5, "cpu").attach(transformer)
    parts = {"transformer": transformer}
    before = _state(parts)
    [path] = SampleMaker(adapter, _config(["a red circle"]), tmp_path, "cpu", torch.bfloat16).make(5, parts)
    _assert_same_state(before, _state(parts))
    assert read_video_frames(path).shape == (5, 32, 32, 3)
    assert offloader.take_bytes_moved() > 0  # the sample ran through the conductor's hooks


@pytest.mark.parametrize("weight_dtype", ["FLOAT_32", "INT_8"])
def test_a_text_encoder_that_training_holds_is_sampled_as_it_is(models: dict[str, Path], tmp_path: Path, weight_dtype: str) -> None:
    # Fine-tuning keeps a float32 encoder (sampling in bfloat16 must not cast it), textual inversion
    # a quantized one (sampling must not load it again): both stay the very objects training uses.
    adapter = WanAdapter(models["wan21"])
    encoder = adapter.load_text_encoder("cpu", torch.float32, weight_dtype)
    tokenizer = adapter.text_parts()["text_encoder"][0]
    if weight_dtype == "FLOAT_32":
        encoder.requires_grad_(True)
    encoder.train()
    parts = _training_denoisers(adapter)
    parts_and_encoder = {**parts, "text_encoder": encoder}
    before = _state(parts_and_encoder)
    maker = SampleMaker(adapter, _config(["a red circle"]), tmp_path, "cpu", torch.bfloat16, unload_encoders_after=False)
    [path] = maker.make(5, parts)
    _assert_same_state(before, _state(parts_and_encoder))
    assert adapter.text_parts() == {"text_encoder": (tokenizer, encoder)}
    assert "load_text_encoder" not in vars(adapter)  # the stand-in is gone after sampling
    assert read_video_frames(path).shape == (5, 32, 32, 3)
