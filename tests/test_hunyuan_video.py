"""The Hunyuan Video adapter on the tiny HunyuanVideo: its encoders and forward call follow
HunyuanVideoPipeline, a LoRA trains through the real Trainer and loads into the pipeline,
quantization covers every Linear of both block stacks, offloading runs, the presets train, and what
it cannot do yet is refused by name. COMFY files: test_comfy_hunyuan_video.py; FINE_TUNE and
EMBEDDING: test_hunyuan_video_methods.py."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from media_factory import make_clip
from numerics import EPS32, forward_tolerance

from core.config import resolve
from core.errors import ConfigError
from core.models.hunyuan_video import HunyuanVideoAdapter
from core.models.registry import adapter_for, detect_family
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK_LINEAR = re.compile(r"(single_)?transformer_blocks\.\d+\..+")
CAPTIONS = ["a cat", "a much longer caption about a dog running"]


@pytest.fixture(scope="module")
def tiny_hv(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hunyuan_video")


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("one-clip")
    make_clip(folder / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (folder / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    return folder


def hv_config(model: Path, data: Path, root: Path, **overrides) -> dict:
    """A tiny-model run in FLOAT_32 at 64 px and 9 frames."""
    overlay = {
        "training_method": "LORA",
        "model_type": "HUNYUAN_VIDEO",
        "base_model": str(model),
        "train_dtype": "FLOAT_32",
        "transformer": {"train": True, "weight_dtype": "FLOAT_32"},
        "text_encoder": {"train": False, "weight_dtype": "FLOAT_32"},
        "text_encoder_2": {"train": False, "weight_dtype": "FLOAT_32"},
        "vae": {"weight_dtype": "FLOAT_32"},
        "gradient_checkpointing": "OFF",
        "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(root / "workspace"),
        "cache_dir": str(root / "cache"),
        "output_path": str(root / "out" / "lora.safetensors"),
        "resolution": 64,
        "frames": 9,
        "video_config": {"max_frames": 9, "target_fps": 16.0},
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


def _loaded(folder: Path, guidance: float = 1.0) -> HunyuanVideoAdapter:
    adapter = adapter_for({"base_model": str(folder), "model_type": "HUNYUAN_VIDEO", "transformer": {"guidance_scale": guidance}})
    assert isinstance(adapter, HunyuanVideoAdapter)
    return adapter


def _with_text(adapter: HunyuanVideoAdapter) -> HunyuanVideoAdapter:
    for name in adapter.text_encoder_names:
        adapter.load_text_encoder("cpu", torch.float32, name=name)
    return adapter


def _encoder_bound(config, reference: torch.Tensor) -> float:
    """Two float32 forwards of one encoder whose kernels sum in other orders: each layer's outputs are
    sums over hidden + intermediate products, so that many roundings per layer, of the output's scale
    (Higham's any-order sum bound; tests/numerics.py). A real fault (another hidden state, a lost
    template crop, a masked token) moves the embeddings by a good part of their size."""
    roundings = config.num_hidden_layers * (config.hidden_size + config.intermediate_size)
    return roundings * EPS32 * float(reference.abs().max())


@pytest.mark.numerics
def test_sizes_and_text_follow_the_pipeline(tiny_hv: Path) -> None:
    from diffusers import HunyuanVideoPipeline

    assert detect_family(tiny_hv) == "hunyuan_video"
    adapter = _with_text(_loaded(tiny_hv))
    assert (adapter.spatial_ratio, adapter.temporal_ratio, adapter.latent_channels, adapter.size_divisor) == (8, 4, 16, 16)
    assert [n for n in range(1, 18) if adapter.frame_rule.accepts(n)] == [1, 5, 9, 13, 17]  # 4k + 1
    ours = adapter.encode_text(CAPTIONS)
    pipe = HunyuanVideoPipeline.from_pretrained(tiny_hv)
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(CAPTIONS, device="cpu")
    assert set(ours) == set(adapter.condition_layout()) == {"prompt_embeds", "prompt_attention_mask", "pooled_projections"}
    assert ours["prompt_embeds"].shape == embeds.shape == (2, 256, 32)
    # The template's 95 tokens are cut: the mask counts the caption's tokens (and the closing <|eot_id|>).
    assert torch.equal(ours["prompt_attention_mask"], mask.bool()) and 0 < int(mask[0].sum()) < int(mask[1].sum()) < 40
    keep = mask.bool()[:, :, None]
    torch.testing.assert_close(ours["prompt_embeds"], embeds * keep, rtol=0,
                               atol=_encoder_bound(pipe.text_encoder.config, embeds))
    assert not ours["prompt_embeds"][~mask.bool()].any()  # the padding, zeroed so the cache trims it
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0,
                               atol=_encoder_bound(pipe.text_encoder_2.config, pooled))


def test_video_latents_are_scaled_posterior_samples(tiny_hv: Path) -> None:
    adapter = _loaded(tiny_hv)
    vae = adapter.load_vae("cpu", torch.float32)
    frames = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_video(frames, torch.Generator().manual_seed(3))
    expected = vae.encode(frames).latent_dist.sample(generator=torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    assert latents.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(latents, expected.float())


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


def test_predict_calls_the_transformer_as_the_pipeline_does(tiny_hv: Path, recorded_calls) -> None:
    """The pipeline's own two-step run, its transformer calls recorded, against predict at the same
    noise levels: the same latents, float32 timestep sigma * 1000, guidance = guidance_scale * 1000
    in the transformer's dtype, mask, pooled vector, and so the same prediction."""
    from diffusers import HunyuanVideoPipeline

    guidance = 3.5
    adapter = _with_text(_loaded(tiny_hv, guidance=guidance))
    pipe = HunyuanVideoPipeline.from_pretrained(tiny_hv)
    theirs = recorded_calls(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe("a cat", height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=guidance,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    assert len(theirs) == 2
    theirs = list(theirs)  # the hook goes on recording the calls below
    text = adapter.encode_text(["a cat"])
    ours = recorded_calls(pipe.transformer)
    for call, sigma in zip(theirs, pipe.scheduler.sigmas[:2], strict=True):
        prediction = adapter.predict(pipe.transformer, call["hidden_states"], sigma.reshape(1), text)
        mine = ours[-1]
        assert torch.equal(mine["hidden_states"], call["hidden_states"])
        assert mine["timestep"].dtype == call["timestep"].dtype == torch.float32
        torch.testing.assert_close(mine["timestep"], call["timestep"])
        assert mine["guidance"].dtype == call["guidance"].dtype and mine["guidance"].tolist() == call["guidance"].tolist() == [3500.0]
        assert mine["encoder_attention_mask"].dtype == call["encoder_attention_mask"].dtype
        assert torch.equal(mine["encoder_attention_mask"], call["encoder_attention_mask"])
        torch.testing.assert_close(mine["pooled_projections"], call["pooled_projections"])
        keep = call["encoder_attention_mask"].bool()
        torch.testing.assert_close(mine["encoder_hidden_states"][keep], call["encoder_hidden_states"][keep])
        with torch.no_grad():
            expected = pipe.transformer(**{**call, "return_dict": False})[0]
        # The pipeline's padded positions hold what Llama makes of pad tokens, ours zeros: the
        # transformer masks them, so only rounding separates the two (tests/numerics.py).
        tolerance = forward_tolerance(pipe.transformer) * float(expected.abs().max())
        torch.testing.assert_close(prediction, expected, rtol=0, atol=tolerance)
    assert sorted(float(s) for s in pipe.scheduler.sigmas[:2]) == pytest.approx([7 * 0.5 / (1 + 6 * 0.5), 1.0])  # shift 7


def test_the_trimmed_text_of_the_cache_predicts_the_same(tiny_hv: Path) -> None:
    adapter = _with_text(_loaded(tiny_hv))
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    text = adapter.encode_text(CAPTIONS)
    length = int(text["prompt_attention_mask"].sum(1).max())
    trimmed = {k: v if k == "pooled_projections" else v[:, :length] for k, v in text.items()}
    noisy, sigmas = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        full, short = adapter.predict(transformer, noisy, sigmas, text), adapter.predict(transformer, noisy, sigmas, trimmed)
    # The masked tokens weigh nothing; a shorter sequence only sums in another order (tests/numerics.py).
    torch.testing.assert_close(short, full, rtol=0, atol=forward_tolerance(transformer) * float(full.abs().max()))


def test_the_training_guidance_is_the_setting_times_1000(tiny_hv: Path, recorded_calls) -> None:
    adapter = _with_text(_loaded(tiny_hv))
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    calls = recorded_calls(transformer)
    text, noisy = adapter.encode_text(["a cat"]), torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        one = adapter.predict(transformer, noisy, torch.tensor([0.5]), text)
        adapter.configure(resolve({"transformer": {"guidance_scale": 6.0}}))
        six = adapter.predict(transformer, noisy, torch.tensor([0.5]), text)
    assert [c["guidance"].tolist() for c in calls] == [[1000.0], [6000.0]]
    assert not torch.allclose(one, six)
    assert resolve({})["transformer"]["guidance_scale"] == 1.0  # the default


def test_lora_targets_both_stacks_trains_and_loads_into_the_pipeline(tiny_hv: Path, one_clip: Path, tmp_path: Path) -> None:
    # One clip seen over and over: the loss must fall. CPU runs are seeded and deterministic; this one
    # goes from about 4.6 to 3.8 over its first and last ten steps.
    config = hv_config(tiny_hv, one_clip, tmp_path, max_steps=60, learning_rate=0.003, lora={"rank": 16, "alpha": 16.0})
    result = Trainer(config).run()
    assert result.steps == 60 and not result.stopped_early
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    first = sum(r["loss"] for r in records[:10]) / 10
    last = sum(r["loss"] for r in records[-10:]) / 10
    assert last < 0.9 * first, (first, last)

    from diffusers import HunyuanVideoPipeline
    from safetensors.torch import load_file

    (path,) = result.output_paths
    keys = load_file(path)
    modules = {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in keys}
    # The attention projections of both stacks, nothing outside them (not the token refiner's attention).
    assert modules == {name for name in _block_linears(tiny_hv) if ".attn." in name}
    assert any(m.startswith("single_transformer_blocks.") for m in modules) and any(m.startswith("transformer_blocks.") for m in modules)
    pipe = HunyuanVideoPipeline.from_pretrained(tiny_hv)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=gen), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=gen), encoder_attention_mask=torch.ones(1, 6),
                  pooled_projections=torch.randn(1, 32, generator=gen), guidance=torch.tensor([1000.0]), return_dict=False)
    with torch.no_grad():
        before = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(path))
        after = pipe.transformer(**inputs)[0]
    loaded = {n for n, m in pipe.transformer.named_modules() if getattr(m, "lora_A", None)}
    assert loaded == modules  # every layer of the file, and no other
    assert not torch.allclose(before, after, atol=1e-5)


def _block_linears(folder: Path) -> set[str]:
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and BLOCK_LINEAR.fullmatch(n)}


@pytest.mark.parametrize("weight_dtype, fmt", [("FLOAT_8", "qfloat8_e4m3fn"), ("NFLOAT_4", "nf4")])
def test_quantized_runs_store_every_block_linear_of_both_stacks_quantized(tiny_hv: Path, one_clip: Path, tmp_path: Path,
                                                                          weight_dtype: str, fmt: str) -> None:
    from core.memory.quantize import quantized_layer_names

    adapter = _loaded(tiny_hv)
    block_linears = _block_linears(tiny_hv)
    assert any(n.startswith("single_") for n in block_linears) and any(n.startswith("transformer_blocks.") for n in block_linears)
    quantized = adapter.load_quantized_transformer("transformer", weight_dtype, cache_dir=tmp_path / "qcache")
    assert set(quantized_layer_names(quantized)) == block_linears
    # The Llama encoder quantized for caching too; CLIP stays as it is.
    config = hv_config(tiny_hv, one_clip, tmp_path, transformer={"weight_dtype": weight_dtype},
                       text_encoder={"weight_dtype": weight_dtype})
    result = Trainer(config).run()
    assert result.steps == 3 and result.final_loss is not None
    info = json.loads((tmp_path / "workspace" / "run_info.json").read_text(encoding="utf-8"))
    assert set(info["parts"]["transformer"]["quantized_bytes_by_format"]) == {fmt}


def test_the_llama_encoder_quantizes_its_decoder_layers(tiny_hv: Path) -> None:
    from core.memory.quantize import quantized_layer_names

    adapter = _loaded(tiny_hv)
    encoder = adapter.load_text_encoder("cpu", torch.bfloat16, "FLOAT_8", name="text_encoder")
    linears = {n for n, m in encoder.named_modules() if "layers." in n and n.rsplit(".", 1)[-1].endswith("proj")}
    assert set(quantized_layer_names(encoder)) == linears and linears
    clip = adapter.load_text_encoder("cpu", torch.bfloat16, "FLOAT_8", name="text_encoder_2")
    assert quantized_layer_names(clip) and all(re.match(r"(text_model\.)?encoder\.layers\.", n) for n in quantized_layer_names(clip))


def test_layer_offload_half_runs_over_both_stacks(tiny_hv: Path, one_clip: Path, tmp_path: Path) -> None:
    config = hv_config(tiny_hv, one_clip, tmp_path, layer_offload_fraction=0.5, gradient_checkpointing="ON")
    result = Trainer(config).run()
    assert result.steps == 3 and result.final_loss is not None


def test_offloading_streams_blocks_of_both_stacks_and_predicts_the_same(tiny_hv: Path) -> None:
    """The tiny model's layout with two blocks per stack: 0.5 of the four offloads one dual-stream and
    one single-stream block, which run resident, and the prediction is the one without offloading."""
    from diffusers import HunyuanVideoTransformer3DModel

    from core.memory.offload import offloaded_block_indices
    from core.train.placement import place_denoiser

    adapter = _with_text(_loaded(tiny_hv))
    config = {k: v for k, v in adapter.transformer_config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**{**config, "num_layers": 2, "num_single_layers": 2}).eval()
    text, noisy = adapter.encode_text(["a cat"]), torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = adapter.predict(model, noisy, torch.tensor([0.5]), text)
    offloader = place_denoiser(model, adapter, {"layer_offload_fraction": 0.5}, torch.device("cpu"))
    offloader.record_trace = True
    assert offloader.offloaded == offloaded_block_indices(0.5, 4) == [1, 3]  # transformer_blocks.1, single_transformer_blocks.1
    with torch.no_grad():
        got = adapter.predict(model, noisy, torch.tensor([0.5]), text)
    assert torch.equal(got, expected)
    runs = [(index, resident) for event, index, resident in offloader.trace if event == "run"]
    assert sorted({index for index, _ in runs}) == [1, 3] and all(index in resident for index, resident in runs)
    offloader.detach()


@pytest.mark.parametrize("override, key", [
    ({"video_config": {"use_temporal_attention": False}}, "video_config.use_temporal_attention"),
])
def test_what_hunyuan_video_cannot_do_yet_is_refused_by_name(tiny_hv: Path, one_clip: Path, tmp_path: Path,
                                                             override: dict, key: str) -> None:
    config = hv_config(tiny_hv, one_clip, tmp_path, **override)
    with pytest.raises(ConfigError) as caught:
        Trainer(config).run()
    assert caught.value.key == key and "HunyuanVideo" in str(caught.value)


@pytest.mark.parametrize("part", ["text_encoder", "text_encoder_2"])
def test_lora_refuses_training_either_text_encoder(tiny_hv: Path, one_clip: Path, tmp_path: Path, part: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Trainer(hv_config(tiny_hv, one_clip, tmp_path, **{part: {"train": True}})).run()
    assert caught.value.key == f"{part}.train"


def test_each_text_encoder_loads_in_its_own_sections_weight_dtype(tiny_hv: Path) -> None:
    from core.memory.quantize import quantized_layer_names
    from core.models.conditions import load_text_encoders, text_weight_dtypes

    adapter = _loaded(tiny_hv)
    config = resolve({"text_encoder": {"weight_dtype": "FLOAT_32"}, "text_encoder_2": {"weight_dtype": "FLOAT_8"}})
    assert text_weight_dtypes(adapter, config) == {"text_encoder": "FLOAT_32", "text_encoder_2": "FLOAT_8"}
    parts = load_text_encoders(adapter, "cpu", text_weight_dtypes(adapter, config))
    llama, clip = parts["text_encoder"][1], parts["text_encoder_2"][1]
    assert not quantized_layer_names(llama) and next(llama.parameters()).dtype == torch.float32
    assert quantized_layer_names(clip)
    assert set(adapter.encode_text(["a cat"])) == {"prompt_embeds", "prompt_attention_mask", "pooled_projections"}


def test_a_single_file_transformer_is_refused_by_name(tiny_hv: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _loaded(tiny_hv).load_transformer("transformer", "cpu", torch.float32, checkpoint="/nowhere/t.safetensors")
    assert caught.value.key == "transformer.model_path"


def test_sample_runs_the_pipeline(tiny_hv: Path) -> None:
    from core.models.base import SampleRequest

    adapter = _loaded(tiny_hv)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    video = adapter.sample({"transformer": transformer}, SampleRequest("a cat", 70, 64, 10, 2, 6.0, 0),
                           device="cpu", dtype=torch.float32)
    assert video.shape == (9, 64, 64, 3) and video.dtype.name == "uint8"


PRESETS = ["#hunyuan video LoRA", "#hunyuan video LoRA 16GB"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_train_the_tiny_model_with_only_model_data_and_output_changed(tiny_hv: Path, one_clip: Path,
                                                                              tmp_path: Path, preset: str) -> None:
    from core.config import list_presets, load_preset

    info = {p.name: p for p in list_presets()}[preset]
    assert info.bundled and info.error is None and info.description
    loaded = load_preset(preset)
    assert loaded["model_type"] == "HUNYUAN_VIDEO" and loaded["base_model"] == "hunyuanvideo-community/HunyuanVideo"
    config = resolve(dict(loaded), {
        "base_model": str(tiny_hv),
        "datasets": [{"path": str(one_clip), "repeats": 1}],
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


def test_a_batch_of_captions_of_different_lengths_trains_and_validates(tiny_hv: Path, one_clip: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache stores each caption's own tokens; the collate pads embeddings and mask back together."""
    batches: list[dict] = []
    predict = HunyuanVideoAdapter.predict

    def recording(self, transformer, noisy, sigmas, batch, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        batches.append({k: batch[k] for k in ("prompt_embeds", "prompt_attention_mask", "pooled_projections")})
        return predict(self, transformer, noisy, sigmas, batch, *args, **kwargs)

    monkeypatch.setattr(HunyuanVideoAdapter, "predict", recording)
    data = tmp_path / "two"
    data.mkdir()
    for name, caption in (("a", "a square"), ("b", "a red square moving slowly from the left to the right of the frame")):
        make_clip(data / f"{name}.mp4", width=64, height=64, fps=16, seconds=1.0)
        (data / f"{name}.txt").write_text(caption, encoding="utf-8")
    config = hv_config(tiny_hv, data, tmp_path, max_steps=2, batch_size=2,
                       video_config={"video_batch_size_multiplier": 1.0},
                       validation={"every_n_steps": 2, "folder": str(one_clip)})
    result = Trainer(config).run()
    assert result.steps == 2 and result.final_loss is not None
    pairs = [b for b in batches if b["prompt_embeds"].shape[0] == 2]
    assert pairs, [tuple(b["prompt_embeds"].shape) for b in batches]
    for batch in pairs:
        mask = batch["prompt_attention_mask"]
        assert batch["prompt_embeds"].shape[:2] == mask.shape and batch["pooled_projections"].shape == (2, 32)
        lengths = mask.sum(1).tolist()
        # Stored trimmed, restored to the 256 tokens encode_text gave, as the pipeline passes them.
        assert lengths[0] != lengths[1] and mask.shape[1] == 256
        assert not batch["prompt_embeds"][~mask.bool()].any()
    values = [r["val_loss"] for r in read_metrics(tmp_path / "workspace" / "metrics.jsonl") if "val_loss" in r]
    assert values and all(v == v and 0 < v < 100 for v in values)


def test_samples_during_training(tiny_hv: Path, one_clip: Path, tmp_path: Path) -> None:
    config = hv_config(tiny_hv, one_clip, tmp_path, max_steps=2,
                       sampling={"every_n_steps": 2, "prompts": ["a cat"], "width": 64, "height": 64, "frames": 9,
                                 "inference_steps": 2})
    result = Trainer(config).run()
    assert result.steps == 2
    assert list((tmp_path / "workspace" / "samples").glob("step-000002-*.mp4"))
