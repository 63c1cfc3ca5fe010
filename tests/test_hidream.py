"""The HiDream adapter on the tiny HiDream-I1: its encoders and forward call follow HiDreamImagePipeline
(the sign and timestep of its denoising step included), images train as one-frame latents, a LoRA
trains through the real Trainer and loads into the pipeline, quantization covers every Linear of both
block stacks, the MoE's auxiliary loss stays off, the presets train, and samples are PNGs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from media_factory import make_clip, make_image
from numerics import EPS32, forward_tolerance

from core.config import resolve
from core.errors import ConfigError
from core.models.hidream import HiDreamAdapter
from core.models.registry import adapter_for, detect_family
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK_LINEAR = re.compile(r"(double|single)_stream_blocks\.\d+\..+")
CAPTIONS = ["a cat", "a much longer caption about a dog running"]
TEXT_KEYS = {"t5_embeds", "llama_embeds", "pooled_embeds"}


@pytest.fixture(scope="module")
def tiny_hd(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hidream")


@pytest.fixture(scope="module")
def one_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("one-image")
    make_image(folder / "image.png", width=64, height=64, index=3)
    (folder / "image.txt").write_text("a gray square with a marker", encoding="utf-8")
    return folder


def hd_config(model: Path, data: Path, root: Path, **overrides) -> dict:
    """A tiny-model run in FLOAT_32 at 64 px (one frame)."""
    overlay = {
        "training_method": "LORA",
        "model_type": "HIDREAM",
        "base_model": str(model),
        "train_dtype": "FLOAT_32",
        "transformer": {"train": True, "weight_dtype": "FLOAT_32"},
        **{name: {"train": False, "weight_dtype": "FLOAT_32"}
           for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")},
        "vae": {"weight_dtype": "FLOAT_32"},
        "gradient_checkpointing": "OFF",
        "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(root / "workspace"),
        "cache_dir": str(root / "cache"),
        "output_path": str(root / "out" / "lora.safetensors"),
        "resolution": 64,
        "frames": 1,
        # The VAE does not compress time: the setting says so, as the presets do.
        "video_config": {"temporal_compression_ratio": 1},
        "lora": {"rank": 8, "alpha": 8.0},
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 0},
        "validation": {"every_n_steps": 0},
        "dataloader_threads": 0,
        "warmup_steps": 0,
        "max_steps": 3,
    }
    config = resolve(overlay)
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def _loaded(folder: Path) -> HiDreamAdapter:
    adapter = adapter_for({"base_model": str(folder), "model_type": "HIDREAM"})
    assert isinstance(adapter, HiDreamAdapter)
    return adapter


def _with_text(adapter: HiDreamAdapter) -> HiDreamAdapter:
    for name in adapter.text_encoder_names:
        adapter.load_text_encoder("cpu", torch.float32, name=name)
    return adapter


def _encoder_bound(config, reference: torch.Tensor) -> float:
    """Two float32 forwards of one encoder whose kernels sum in other orders: each layer's outputs are
    sums over hidden + intermediate products, so that many roundings per layer, of the output's scale
    (Higham's any-order sum bound; tests/numerics.py)."""
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    hidden = getattr(config, "hidden_size", None) or config.d_model
    inner = getattr(config, "intermediate_size", None) or config.d_ff
    return layers * (hidden + inner) * EPS32 * float(reference.abs().max())


def _pipe(folder: Path):
    from diffusers import HiDreamImagePipeline

    pipe = HiDreamImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.numerics
def test_sizes_and_text_follow_the_pipeline(tiny_hd: Path) -> None:
    assert detect_family(tiny_hd) == "hidream"
    adapter = _with_text(_loaded(tiny_hd))
    assert (adapter.spatial_ratio, adapter.temporal_ratio, adapter.latent_channels, adapter.size_divisor) == (8, 1, 16, 16)
    assert [n for n in range(1, 10) if adapter.frame_rule.accepts(n)] == [1]  # stills only
    ours = adapter.encode_text(CAPTIONS)
    pipe = _pipe(tiny_hd)
    with torch.no_grad():
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, None, device="cpu",
                                                         do_classifier_free_guidance=False)
    assert set(ours) == set(adapter.condition_layout()) == TEXT_KEYS
    assert ours["t5_embeds"].shape == t5.shape == (2, 128, 32)
    torch.testing.assert_close(ours["t5_embeds"], t5, rtol=0, atol=_encoder_bound(pipe.text_encoder_3.config, t5))
    # The pipeline stacks every decoder layer's output; the transformer reads the llama_layers ones.
    layers = pipe.transformer.config.llama_layers
    assert adapter.llama_layers == sorted(set(layers)) and llama.shape == (4, 2, 128, 48)
    expected = torch.stack([llama[k] for k in adapter.llama_layers], dim=1)
    assert ours["llama_embeds"].shape == expected.shape == (2, len(adapter.llama_layers), 128, 48)
    torch.testing.assert_close(ours["llama_embeds"], expected, rtol=0,
                               atol=_encoder_bound(pipe.text_encoder_4.config, expected))
    assert ours["pooled_embeds"].shape == pooled.shape == (2, 16 + 24)
    bound = max(_encoder_bound(pipe.text_encoder.config, pooled), _encoder_bound(pipe.text_encoder_2.config, pooled))
    torch.testing.assert_close(ours["pooled_embeds"], pooled, rtol=0, atol=bound)


def test_image_latents_are_shifted_and_scaled_posterior_samples(tiny_hd: Path) -> None:
    adapter = _loaded(tiny_hd)
    vae = adapter.load_vae("cpu", torch.float32)
    frames = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_video(frames, torch.Generator().manual_seed(3))
    sample = vae.encode(frames[:, :, 0]).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    expected = (sample - vae.config.shift_factor) * vae.config.scaling_factor
    assert latents.shape == (1, 16, 1, 4, 4)
    torch.testing.assert_close(latents[:, :, 0], expected.float())
    # The pipeline decodes latents / scaling_factor + shift_factor: the round trip gives the sample back.
    torch.testing.assert_close(latents[:, :, 0] / vae.config.scaling_factor + vae.config.shift_factor, sample)
    with pytest.raises(ValueError, match="one frame"):
        adapter.encode_video(torch.zeros(1, 3, 5, 32, 32))


@pytest.fixture
def recorded_calls() -> Iterator[Callable[[torch.nn.Module], list[dict]]]:
    handles = []

    def record(module: torch.nn.Module) -> list[dict]:
        calls: list[dict] = []
        handles.append(module.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(dict(kwargs)), with_kwargs=True))
        return calls

    yield record
    for handle in handles:
        handle.remove()


@pytest.mark.numerics
def test_predict_is_the_velocity_of_the_pipelines_denoising_step(tiny_hd: Path, recorded_calls) -> None:
    """The pipeline's own two-step run, its transformer calls and scheduler steps recorded, against
    predict at the same noise levels: timesteps sigma * 1000, and the output negated, so that the
    scheduler's Euler step with our prediction is the pipeline's step (the velocity noise - x0)."""
    adapter = _with_text(_loaded(tiny_hd))
    pipe = _pipe(tiny_hd)
    pipe.default_sample_size = 4  # 32 x 32 pixels: the pipeline rescales every request to this area
    theirs = recorded_calls(pipe.transformer)
    steps: list[tuple] = []
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, **kwargs):
        steps.append((model_output.clone(), sample.clone()))
        return step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = recording_step
    pipe("a cat", num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
         output_type="latent")
    assert len(theirs) == len(steps) == 2
    theirs = list(theirs)
    text = adapter.encode_text(["a cat"])
    ours = recorded_calls(pipe.transformer)
    sigmas = pipe.scheduler.sigmas[:2]
    for call, (velocity, sample), sigma in zip(theirs, steps, sigmas, strict=True):
        assert torch.equal(call["hidden_states"], sample)
        with torch.no_grad():
            prediction = adapter.predict(pipe.transformer, sample.unsqueeze(2), sigma.reshape(1), text)
        mine = ours[-1]
        assert torch.equal(mine["hidden_states"], call["hidden_states"])
        torch.testing.assert_close(mine["timesteps"].float(), call["timesteps"].float())
        assert float(mine["timesteps"][0]) == pytest.approx(float(sigma) * 1000)
        tolerance = forward_tolerance(pipe.transformer) * float(velocity.abs().max())
        # What the scheduler stepped with is -transformer(...): our prediction is that, frame axis restored.
        assert prediction.shape == (1, 16, 1, 4, 4)
        torch.testing.assert_close(prediction[:, :, 0], velocity, rtol=0, atol=tolerance)


@pytest.mark.numerics
def test_training_mode_predicts_as_eval_mode(tiny_hd: Path) -> None:
    """In training mode the transformer returns its patched layout (B, C, S, p*p) and runs the routed
    experts with gradients; predict lays it out as an image again, square or not."""
    adapter = _with_text(_loaded(tiny_hd))
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    text = adapter.encode_text(["a cat"])
    for h, w in ((4, 4), (4, 6)):
        noisy = torch.randn(1, 16, 1, h, w, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            transformer.eval()
            inference = adapter.predict(transformer, noisy, torch.tensor([0.4]), text)
            transformer.train()
            training = adapter.predict(transformer, noisy, torch.tensor([0.4]), text)
        transformer.eval()
        assert training.shape == inference.shape == (1, 16, 1, h, w)
        tolerance = forward_tolerance(transformer) * float(inference.abs().max())
        torch.testing.assert_close(training, inference, rtol=0, atol=tolerance)


def test_the_moe_auxiliary_loss_is_off_in_training(tiny_hd: Path) -> None:
    from diffusers.models.transformers.transformer_hidream_image import MoEGate

    adapter = _loaded(tiny_hd)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32).train()
    gates = [m for m in transformer.modules() if isinstance(m, MoEGate)]
    assert len(gates) == 3 and all(g.alpha == 0.0 for g in gates)  # one per block of both stacks
    outputs = []
    handles = [g.register_forward_hook(lambda _m, _i, out: outputs.append(out[2])) for g in gates]
    text = _with_text(adapter).encode_text(["a cat"])
    adapter.predict(transformer, torch.randn(1, 16, 1, 4, 4), torch.tensor([0.5]), text)
    for handle in handles:
        handle.remove()
    assert len(outputs) == 3 and all(aux is None for aux in outputs)
    # diffusers' own default computes it in training mode (and then drops it).
    fresh = type(gates[0])(embed_dim=gates[0].gating_dim).train()
    assert fresh.alpha > 0 and fresh(torch.randn(1, 4, gates[0].gating_dim))[2] is not None


def _block_linears(folder: Path) -> set[str]:
    from diffusers import HiDreamImageTransformer2DModel

    model = HiDreamImageTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and BLOCK_LINEAR.fullmatch(n)}


def _transformer_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, 4, 4, generator=gen), "timesteps": torch.tensor([500.0]),
            "encoder_hidden_states_t5": torch.randn(1, 8, 32, generator=gen),
            "encoder_hidden_states_llama3": torch.randn(4, 1, 8, 48, generator=gen),
            "pooled_embeds": torch.randn(1, 40, generator=gen), "return_dict": False}


def test_lora_on_an_image_trains_and_loads_into_the_pipeline(tiny_hd: Path, one_image: Path, tmp_path: Path) -> None:
    # One image seen over and over: the loss must fall. CPU runs are seeded and deterministic.
    config = hd_config(tiny_hd, one_image, tmp_path, max_steps=60, learning_rate=0.003, lora={"rank": 16, "alpha": 16.0})
    result = Trainer(config).run()
    assert result.steps == 60 and not result.stopped_early
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    first = sum(r["loss"] for r in records[:10]) / 10
    last = sum(r["loss"] for r in records[-10:]) / 10
    assert last < 0.9 * first, (first, last)

    from safetensors.torch import load_file

    (path,) = result.output_paths
    modules = {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in load_file(path)}
    # The image stream's attention projections of both stacks (diffusers' HiDream DreamBooth default).
    expected = {n for n in _block_linears(tiny_hd) if re.search(r"\.attn1\.to_(q|k|v|out)$", n)}
    assert modules == expected
    assert any(m.startswith("single_stream_blocks.") for m in modules) and any(m.startswith("double_stream_blocks.") for m in modules)
    pipe = _pipe(tiny_hd)
    with torch.no_grad():
        before = pipe.transformer(**_transformer_inputs())[0]
        pipe.load_lora_weights(str(path))
        after = pipe.transformer(**_transformer_inputs())[0]
    loaded = {n for n, m in pipe.transformer.named_modules() if getattr(m, "lora_A", None)}
    assert loaded == modules  # every layer of the file, and no other
    assert not torch.allclose(before, after, atol=1e-5)
    # And the pipeline's image changes with it.
    pipe.default_sample_size = 4
    images = []
    for lora in (False, True):
        if not lora:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
        images.append(pipe("a gray square with a marker", num_inference_steps=2, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(0), output_type="np").images)
    assert images[0].shape == images[1].shape == (1, 32, 32, 3)
    assert float(abs(images[0] - images[1]).max()) > 1e-3


@pytest.mark.parametrize("weight_dtype, fmt", [("FLOAT_8", "qfloat8_e4m3fn"), ("NFLOAT_4", "nf4")])
def test_quantized_runs_store_every_block_linear_of_both_stacks_quantized(tiny_hd: Path, one_image: Path, tmp_path: Path,
                                                                          weight_dtype: str, fmt: str) -> None:
    from core.memory.quantize import quantized_layer_names

    adapter = _loaded(tiny_hd)
    block_linears = _block_linears(tiny_hd)
    # Attention, shared and routed experts and the modulation of both stacks.
    assert any(n.startswith("single_") for n in block_linears) and any(n.startswith("double_") for n in block_linears)
    assert any(".experts." in n for n in block_linears) and any(".shared_experts." in n for n in block_linears)
    quantized = adapter.load_quantized_transformer("transformer", weight_dtype, cache_dir=tmp_path / "qcache")
    assert set(quantized_layer_names(quantized)) == block_linears
    config = hd_config(tiny_hd, one_image, tmp_path, transformer={"weight_dtype": weight_dtype},
                       text_encoder_4={"weight_dtype": weight_dtype})
    result = Trainer(config).run()
    assert result.steps == 3 and result.final_loss is not None
    info = json.loads((tmp_path / "workspace" / "run_info.json").read_text(encoding="utf-8"))
    assert set(info["parts"]["transformer"]["quantized_bytes_by_format"]) == {fmt}


def test_each_text_encoder_quantizes_its_layers_in_its_own_sections_weight_dtype(tiny_hd: Path) -> None:
    from core.memory.quantize import quantized_layer_names
    from core.models.conditions import load_text_encoders, text_weight_dtypes

    adapter = _loaded(tiny_hd)
    config = resolve({"text_encoder": {"weight_dtype": "FLOAT_32"}, "text_encoder_2": {"weight_dtype": "FLOAT_8"},
                      "text_encoder_3": {"weight_dtype": "FLOAT_32"}, "text_encoder_4": {"weight_dtype": "NFLOAT_4"}})
    dtypes = text_weight_dtypes(adapter, config)
    assert dtypes == {"text_encoder": "FLOAT_32", "text_encoder_2": "FLOAT_8", "text_encoder_3": "FLOAT_32",
                      "text_encoder_4": "NFLOAT_4"}
    parts = load_text_encoders(adapter, "cpu", dtypes)
    assert not quantized_layer_names(parts["text_encoder"][1]) and not quantized_layer_names(parts["text_encoder_3"][1])
    clip_g = quantized_layer_names(parts["text_encoder_2"][1])
    assert clip_g and all(re.match(r"(text_model\.)?encoder\.layers\.", n) for n in clip_g)
    llama = parts["text_encoder_4"][1]
    linears = {n for n, m in llama.named_modules() if n.startswith("layers.") and n.rsplit(".", 1)[-1].endswith("proj")}
    assert set(quantized_layer_names(llama)) == linears and linears  # a 4-bit Llama runs:
    assert set(adapter.encode_text(["a cat"])) == TEXT_KEYS


def test_layer_offload_half_runs_over_both_stacks(tiny_hd: Path, one_image: Path, tmp_path: Path) -> None:
    config = hd_config(tiny_hd, one_image, tmp_path, layer_offload_fraction=0.5, gradient_checkpointing="ON")
    result = Trainer(config).run()
    assert result.steps == 3 and result.final_loss is not None


@pytest.mark.parametrize("override, key", [
    ({"video_config": {"use_temporal_attention": False}}, "video_config.use_temporal_attention"),
    ({"training_method": "EMBEDDING", "transformer": {"train": False},
      "embedding": {"placeholder_tokens": ["<c>"], "initializer_words": ["square"]}}, "training_method"),
    ({"transformer": {"guidance_scale": 6.0}}, "transformer.guidance_scale"),
])
def test_what_hidream_cannot_do_yet_is_refused_by_name(tiny_hd: Path, one_image: Path, tmp_path: Path,
                                                       override: dict, key: str) -> None:
    config = hd_config(tiny_hd, one_image, tmp_path, **override)
    with pytest.raises(ConfigError) as caught:
        Trainer(config).run()
    assert caught.value.key == key and "HiDream" in str(caught.value)


@pytest.mark.parametrize("part", ["text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"])
def test_lora_refuses_training_any_text_encoder(tiny_hd: Path, one_image: Path, tmp_path: Path, part: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Trainer(hd_config(tiny_hd, one_image, tmp_path, **{part: {"train": True}})).run()
    assert caught.value.key == f"{part}.train"


def test_a_video_clip_is_left_out_by_name_and_the_images_train(tiny_hd: Path, one_image: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "mixed"
    data.mkdir()
    make_image(data / "still.png", width=64, height=64, index=1)
    (data / "still.txt").write_text("a still", encoding="utf-8")
    make_clip(data / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (data / "clip.txt").write_text("a moving square", encoding="utf-8")
    result = Trainer(hd_config(tiny_hd, data, tmp_path, max_steps=2)).run()
    assert result.steps == 2
    assert any("clip.mp4" in r.getMessage() and "image model" in r.getMessage() for r in caplog.records), caplog.text
    only_clips = tmp_path / "clips"
    only_clips.mkdir()
    make_clip(only_clips / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (only_clips / "clip.txt").write_text("a moving square", encoding="utf-8")
    from core.errors import UserError

    with pytest.raises(UserError, match="image model"):
        Trainer(hd_config(tiny_hd, only_clips, tmp_path / "second")).run()


def test_a_single_file_transformer_is_refused_by_name(tiny_hd: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _loaded(tiny_hd).load_transformer("transformer", "cpu", torch.float32, checkpoint="/nowhere/t.safetensors")
    assert caught.value.key == "transformer.model_path"


def test_sample_runs_the_pipeline_at_the_asked_size(tiny_hd: Path) -> None:
    from core.models.base import SampleRequest

    adapter = _loaded(tiny_hd)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    for width, height in ((70, 64), (48, 32)):
        image = adapter.sample({"transformer": transformer}, SampleRequest("a cat", width, height, 9, 2, 3.0, 0),
                               device="cpu", dtype=torch.float32)
        assert image.shape == (1, height, width // 16 * 16, 3) and image.dtype.name == "uint8"


def test_samples_during_training_are_pngs(tiny_hd: Path, one_image: Path, tmp_path: Path) -> None:
    from PIL import Image

    config = hd_config(tiny_hd, one_image, tmp_path, max_steps=2,
                       sampling={"every_n_steps": 2, "prompts": ["a cat"], "width": 64, "height": 48, "frames": 1,
                                 "inference_steps": 2})
    result = Trainer(config).run()
    assert result.steps == 2
    (png,) = (tmp_path / "workspace" / "samples").glob("step-000002-*")
    assert png.suffix == ".png"
    with Image.open(png) as image:
        assert image.size == (64, 48) and image.mode == "RGB"


PRESETS = ["#hidream LoRA", "#hidream LoRA 16GB"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_train_the_tiny_model_with_only_model_data_and_output_changed(tiny_hd: Path, one_image: Path,
                                                                              tmp_path: Path, preset: str) -> None:
    from core.config import list_presets, load_preset

    info = {p.name: p for p in list_presets()}[preset]
    assert info.bundled and info.error is None and "images" in info.description
    loaded = load_preset(preset)
    assert loaded["model_type"] == "HIDREAM" and loaded["base_model"] == "HiDream-ai/HiDream-I1-Full"
    config = resolve(dict(loaded), {
        "base_model": str(tiny_hd),
        "datasets": [{"path": str(one_image), "repeats": 1}],
        "output_path": str(tmp_path / "out" / "lora.safetensors"),
        # Where files go and the run's length, as the other preset tests set them.
        "workspace_dir": str(tmp_path / "workspace"),
        "cache_dir": str(tmp_path / "cache"),
        "dataloader_threads": 0,
        "max_steps": 2,
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 0},
    })
    result = Trainer(config).run()
    assert result.steps == 2 and result.final_loss is not None and result.output_paths == [tmp_path / "out" / "lora.safetensors"]


def test_a_batch_of_two_images_trains_and_validates(tiny_hd: Path, one_image: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed-size conditions (T5's 128 tokens, the kept Llama layers, the pooled vector) stack into
    a batch as encode_text gave them; validation runs the eval-mode path."""
    batches: list[dict] = []
    predict = HiDreamAdapter.predict

    def recording(self, transformer, noisy, sigmas, batch, *args, **kwargs):
        batches.append({"noisy": tuple(noisy.shape), **{k: tuple(batch[k].shape) for k in TEXT_KEYS}})
        return predict(self, transformer, noisy, sigmas, batch, *args, **kwargs)

    monkeypatch.setattr(HiDreamAdapter, "predict", recording)
    data = tmp_path / "two"
    data.mkdir()
    for index, caption in enumerate(("a square", "a red square on a gray ground, seen from above")):
        make_image(data / f"{index}.png", width=64, height=64, index=index)
        (data / f"{index}.txt").write_text(caption, encoding="utf-8")
    config = hd_config(tiny_hd, data, tmp_path, max_steps=2, batch_size=2,
                       validation={"every_n_steps": 2, "folder": str(one_image)})
    result = Trainer(config).run()
    assert result.steps == 2 and result.final_loss is not None
    assert {"noisy": (2, 16, 1, 8, 8), "t5_embeds": (2, 128, 32), "llama_embeds": (2, 3, 128, 48),
            "pooled_embeds": (2, 40)} in batches
    values = [r["val_loss"] for r in read_metrics(tmp_path / "workspace" / "metrics.jsonl") if "val_loss" in r]
    assert values and all(0 < v < 100 for v in values)
