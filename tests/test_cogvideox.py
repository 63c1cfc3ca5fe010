"""The CogVideoX adapter on the tiny CogVideoX (the 2b layout): its encoders and forward call follow
CogVideoXPipeline, a LoRA trains through the real Trainer with the seed's objective and loads into the
pipeline, quantization covers every block Linear, offloading runs, and what it cannot do is refused."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from media_factory import make_clip
from numerics import EPS32

from core.config import resolve
from core.errors import ConfigError
from core.models.cogvideox import CogVideoXAdapter
from core.models.registry import adapter_for, detect_family
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

BLOCK_LINEAR = re.compile(r"transformer_blocks\.\d+\..+")


@pytest.fixture(scope="module")
def tiny_cog(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("cogvideox")


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("one-clip")
    make_clip(folder / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (folder / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    return folder


def cog_config(model: Path, data: Path, root: Path, **overrides) -> dict:
    """A tiny-model run in FLOAT_32 at 64 px and 9 frames with the seed's objective."""
    overlay = {
        "training_method": "LORA",
        "base_model": str(model),
        "train_dtype": "FLOAT_32",
        "transformer": {"train": True, "weight_dtype": "FLOAT_32"},
        "text_encoder": {"train": False, "weight_dtype": "FLOAT_32"},
        "vae": {"weight_dtype": "FLOAT_32"},
        "gradient_checkpointing": "OFF",
        "objective": {"timestep_distribution": "UNIFORM", "loss_weighting": "SNR"},
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


def _loaded(folder: Path) -> CogVideoXAdapter:
    adapter = adapter_for({"base_model": str(folder), "model_type": "COGVIDEOX"})
    assert isinstance(adapter, CogVideoXAdapter)
    return adapter


@pytest.mark.numerics
def test_sizes_and_text_follow_the_pipeline(tiny_cog: Path) -> None:
    from diffusers import CogVideoXPipeline

    assert detect_family(tiny_cog) == "cogvideox"
    adapter = _loaded(tiny_cog)
    assert (adapter.spatial_ratio, adapter.temporal_ratio, adapter.latent_channels, adapter.size_divisor) == (8, 4, 16, 16)
    assert adapter.max_text_length == 226 and adapter.frame_rule.accepts(9) and not adapter.frame_rule.accepts(8)
    adapter.load_text_encoder("cpu", torch.float32)
    ours = adapter.encode_text(["a cat", "a much longer caption about a dog running"])["prompt_embeds"]
    pipe = CogVideoXPipeline.from_pretrained(tiny_cog)
    theirs = pipe._get_t5_prompt_embeds(["a cat", "a much longer caption about a dog running"], device="cpu",
                                        dtype=torch.float32)
    assert ours.shape == (2, 226, 32)
    # The same tokens and the same unmasked encoder, but the two loads' kernels round differently
    # (17-19 float32 ulps of the largest value here under the default and AVX2 kernels). A bound
    # that holds on any CPU: each layer's outputs are sums over d_model + d_ff products, so allow that
    # many roundings per layer, of the output's scale (Higham's any-order sum bound). A real fault
    # (masked or mis-padded tokens, another encoder) moves the embeddings by a good part of their size.
    config = adapter.text_parts()["text_encoder"][1].config
    roundings = config.num_layers * (config.d_model + config.d_ff)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=roundings * EPS32 * float(theirs.abs().max()))
    assert set(adapter.condition_layout()) == {"prompt_embeds"}


def test_video_latents_are_scaled_posterior_samples(tiny_cog: Path) -> None:
    adapter = _loaded(tiny_cog)
    vae = adapter.load_vae("cpu", torch.float32)
    frames = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_video(frames, torch.Generator().manual_seed(3))
    expected = vae.encode(frames).latent_dist.sample(generator=torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    assert latents.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(latents, expected.float())


class _Spy(torch.nn.Module):
    """Records what the transformer is called with; returns its input reversed on the frame axis."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []
        self.config, self.patch_embed = inner.config, inner.patch_embed

    def forward(self, **kwargs):  # noqa: ANN003, ANN201 - the transformer's keywords
        self.calls.append(kwargs)
        return (kwargs["hidden_states"].flip(1),)


def test_predict_gives_the_int64_timestep_and_keeps_the_cache_layout(tiny_cog: Path) -> None:
    adapter = _loaded(tiny_cog)
    spy = _Spy(adapter.load_transformer("transformer", "cpu", torch.float32))
    noisy = torch.randn(2, 16, 3, 4, 6)
    sigmas = torch.tensor([0.0, 0.7])
    out = adapter.predict(spy, noisy, sigmas, {"prompt_embeds": torch.zeros(2, 226, 32)})
    (call,) = spy.calls
    assert call["hidden_states"].shape == (2, 3, 16, 4, 6)  # (B, F, C, H, W) in
    assert call["timestep"].dtype == torch.int64
    assert call["timestep"].tolist() == adapter.objective({"loss_weighting": "SNR"}).model_timestep(sigmas).tolist() == [0, 700]
    assert call["image_rotary_emb"] is None  # the 2b layout has sinusoidal positions
    torch.testing.assert_close(out, noisy.flip(2))  # back in (B, C, F, H, W)
    # The real transformer's output has the input's layout.
    real = adapter.predict(spy.inner, noisy, sigmas, {"prompt_embeds": torch.zeros(2, 226, 32)})
    assert real.shape == noisy.shape


def test_rotary_embeddings_are_the_pipelines(tiny_cog: Path, tmp_path: Path) -> None:
    """A 5b-like copy (rotary embeddings): predict passes what CogVideoXPipeline builds for the size."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    folder = tmp_path / "rope"
    shutil.copytree(tiny_cog, folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config.update(use_rotary_positional_embeddings=True)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(**config).save_pretrained(folder / "transformer")
    adapter = _loaded(folder)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    pipe = CogVideoXPipeline.from_pretrained(folder)
    expected = pipe._prepare_rotary_positional_embeddings(48, 64, 3, torch.device("cpu"))
    spy = _Spy(transformer)
    adapter.predict(spy, torch.randn(1, 16, 3, 6, 8), torch.tensor([0.5]), {"prompt_embeds": torch.zeros(1, 226, 32)})
    for ours, theirs in zip(spy.calls[0]["image_rotary_emb"], expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    out = adapter.predict(transformer, torch.randn(1, 16, 3, 6, 8), torch.tensor([0.5]), {"prompt_embeds": torch.zeros(1, 226, 32)})
    assert out.shape == (1, 16, 3, 6, 8) and torch.isfinite(out).all()


def test_lora_trains_loss_falls_and_loads_into_the_pipeline(tiny_cog: Path, one_clip: Path, tmp_path: Path) -> None:
    # One clip seen over and over with the seed's objective (t uniform, SNR weighting): the loss must
    # fall. CPU runs are seeded and deterministic; this one goes from about 4.4 to 3.8 (the tiny
    # random model's attention-only LoRA levels off there; Wan's tiny run falls by as much).
    config = cog_config(tiny_cog, one_clip, tmp_path, max_steps=100, learning_rate=0.003, lora={"rank": 16, "alpha": 16.0})
    result = Trainer(config).run()
    assert result.steps == 100 and not result.stopped_early
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    first = sum(r["loss"] for r in records[:10]) / 10
    last = sum(r["loss"] for r in records[-10:]) / 10
    assert last < 0.9 * first, (first, last)

    from diffusers import CogVideoXPipeline

    (path,) = result.output_paths
    pipe = CogVideoXPipeline.from_pretrained(tiny_cog)
    x = torch.randn(1, 3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 226, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        before = pipe.transformer(x, text, t, return_dict=False)[0]
        pipe.load_lora_weights(str(path))
        after = pipe.transformer(x, text, t, return_dict=False)[0]
    assert not torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("weight_dtype, fmt", [("FLOAT_8", "qfloat8_e4m3fn"), ("NFLOAT_4", "nf4")])
def test_quantized_runs_store_every_block_linear_quantized(tiny_cog: Path, one_clip: Path, tmp_path: Path,
                                                           weight_dtype: str, fmt: str) -> None:
    from core.memory.quantize import quantized_layer_names

    adapter = _loaded(tiny_cog)
    plain = adapter.load_transformer("transformer", "cpu", torch.float32)
    block_linears = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and BLOCK_LINEAR.fullmatch(n)}
    quantized = adapter.load_quantized_transformer("transformer", weight_dtype, cache_dir=tmp_path / "qcache")
    assert set(quantized_layer_names(quantized)) == block_linears and block_linears
    config = cog_config(tiny_cog, one_clip, tmp_path, transformer={"weight_dtype": weight_dtype},
                        text_encoder={"weight_dtype": weight_dtype})
    result = Trainer(config).run()
    assert result.steps == 3 and result.final_loss is not None
    info = json.loads((tmp_path / "workspace" / "run_info.json").read_text(encoding="utf-8"))
    assert set(info["parts"]["transformer"]["quantized_bytes_by_format"]) == {fmt}


def test_layer_offload_half_runs(tiny_cog: Path, one_clip: Path, tmp_path: Path) -> None:
    config = cog_config(tiny_cog, one_clip, tmp_path, layer_offload_fraction=0.5, gradient_checkpointing="ON")
    result = Trainer(config).run()
    assert result.steps == 3 and result.final_loss is not None


@pytest.mark.parametrize("override, key", [
    ({"output_format": "COMFY"}, "output_format"),
    ({"video_config": {"use_temporal_attention": False}}, "video_config.use_temporal_attention"),
    ({"objective": {"loss_weighting": "SIGMA_SQRT"}}, "objective.loss_weighting"),
])
def test_what_cogvideox_cannot_do_is_refused_by_name(tiny_cog: Path, one_clip: Path, tmp_path: Path,
                                                     override: dict, key: str) -> None:
    config = cog_config(tiny_cog, one_clip, tmp_path, **override)
    with pytest.raises(ConfigError) as caught:
        Trainer(config).run()
    assert caught.value.key == key
    if key != "objective.loss_weighting":
        assert "CogVideoX" in str(caught.value)


def test_sample_runs_the_pipeline(tiny_cog: Path) -> None:
    from core.models.base import SampleRequest

    adapter = _loaded(tiny_cog)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    video = adapter.sample({"transformer": transformer}, SampleRequest("a cat", 70, 64, 10, 2, 6.0, 0),
                           device="cpu", dtype=torch.float32)
    assert video.shape == (9, 64, 64, 3) and video.dtype.name == "uint8"


PRESETS = ["#cogvideox LoRA", "#cogvideox LoRA 12GB", "#cogvideox Finetune"]


@pytest.mark.parametrize("family", ["cogvideox", "cogvideox15"])
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_train_the_tiny_model_with_only_model_data_and_output_changed(tiny_model: Callable[[str], Path], one_clip: Path,
                                                                              tmp_path: Path, preset: str, family: str) -> None:
    from core.config import list_presets, load_preset

    info = {p.name: p for p in list_presets()}[preset]
    assert info.bundled and info.error is None and info.description
    loaded = load_preset(preset)
    assert loaded["model_type"] == "COGVIDEOX" and loaded["base_model"] == "THUDM/CogVideoX-5b"
    assert loaded["objective"]["timestep_distribution"] == "UNIFORM" and loaded["objective"]["loss_weighting"] == "SNR"
    output = tmp_path / "out" / ("ft" if loaded["training_method"] == "FINE_TUNE" else "lora.safetensors")
    config = resolve(dict(loaded), {
        "base_model": str(tiny_model(family)),
        "datasets": [{"path": str(one_clip), "repeats": 1}],
        "output_path": str(output),
        # Where files go and the run's length, as the other preset tests set them.
        "workspace_dir": str(tmp_path / "workspace"),
        "cache_dir": str(tmp_path / "cache"),
        "dataloader_threads": 0,
        "max_steps": 2,
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 0},
    })
    result = Trainer(config).run()
    assert result.steps == 2 and result.final_loss is not None and result.output_paths == [output]


def test_the_1_5_layout_takes_its_frame_counts_its_rotary_embeddings_and_trains(tiny_model: Callable[[str], Path],
                                                                                 one_clip: Path, tmp_path: Path) -> None:
    from diffusers import CogVideoXPipeline

    folder = tiny_model("cogvideox15")
    adapter = _loaded(folder)
    assert adapter.patch_size_t == 2 and [n for n in range(1, 30) if adapter.frame_rule.accepts(n)] == [1, 9, 17, 25]
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    spy = _Spy(transformer)
    adapter.predict(spy, torch.randn(1, 16, 4, 4, 4), torch.tensor([0.5]), {"prompt_embeds": torch.zeros(1, 226, 32)})
    expected = CogVideoXPipeline.from_pretrained(folder)._prepare_rotary_positional_embeddings(32, 32, 4, torch.device("cpu"))
    assert expected[0].shape[0] == 2 * 2 * 2  # (4 latent frames / 2) x 2 x 2 patches
    for ours, theirs in zip(spy.calls[0]["image_rotary_emb"], expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    # 1.5 slices its rotary tables from sample_height x sample_width; beyond them it is refused in pixels.
    small = tmp_path / "small"
    shutil.copytree(folder, small)
    config_path = small / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sample_height": 8, "sample_width": 8}))
    narrow = _loaded(small)
    from core.errors import UserError

    with pytest.raises(UserError, match="at most 64x64 pixels"):
        narrow.predict(narrow.load_transformer("transformer", "cpu", torch.float32), torch.randn(1, 16, 2, 10, 10),
                       torch.tensor([0.5]), {"prompt_embeds": torch.zeros(1, 226, 32)})
    # A LoRA on one clip seen over and over: the loss falls, and the file changes the pipeline's transformer.
    config = cog_config(folder, one_clip, tmp_path / "run", max_steps=40, learning_rate=0.003, lora={"rank": 16, "alpha": 16.0})
    result = Trainer(config).run()
    records = read_metrics(tmp_path / "run" / "workspace" / "metrics.jsonl")
    first, last = (sum(r["loss"] for r in part) / 10 for part in (records[:10], records[-10:]))
    assert result.steps == 40 and last < 0.95 * first, (first, last)
    pipe = CogVideoXPipeline.from_pretrained(folder)
    x, text = torch.randn(1, 2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 226, 32)
    rotary = pipe._prepare_rotary_positional_embeddings(64, 64, 2, torch.device("cpu"))
    with torch.no_grad():
        before = pipe.transformer(x, text, torch.tensor([500]), image_rotary_emb=rotary, return_dict=False)[0]
        pipe.load_lora_weights(str(result.output_paths[0]))
        after = pipe.transformer(x, text, torch.tensor([500]), image_rotary_emb=rotary, return_dict=False)[0]
    assert not torch.allclose(before, after, atol=1e-5)


def test_the_estimate_counts_the_tiny_cogvideox_folder(tiny_cog: Path) -> None:
    from diffusers import CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    from core.memory.estimate import estimate_memory
    from core.memory.known_models import configs_from_folder
    from core.memory.model_sizes import text_encoder_sizes, transformer_sizes

    configs = configs_from_folder(tiny_cog)
    estimate = estimate_memory(cog_config(tiny_cog, tiny_cog, tiny_cog), configs)
    assert estimate.peak_bytes == sum(estimate.parts.values()) > 0
    model = CogVideoXTransformer3DModel.from_pretrained(tiny_cog / "transformer")
    assert transformer_sizes(configs.transformers[0]).parameters() == sum(p.numel() for p in model.parameters())
    encoder = T5EncoderModel.from_pretrained(tiny_cog / "text_encoder")
    assert text_encoder_sizes(configs.text_encoder).parameters() == sum(p.numel() for p in encoder.parameters())


def test_embedding_trains_a_t5_placeholder_that_loads_back(tiny_cog: Path, tmp_path: Path) -> None:
    from core.train.embedding import load_embedding

    data = tmp_path / "concept"
    data.mkdir()
    make_clip(data / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (data / "clip.txt").write_text("a photo of <concept> moving right", encoding="utf-8")
    output = tmp_path / "out" / "concept.safetensors"
    config = cog_config(tiny_cog, data, tmp_path, training_method="EMBEDDING", output_path=str(output),
                        transformer={"train": False}, embedding_learning_rate=0.05,
                        embedding={"placeholder_tokens": ["<concept>"], "initializer_words": ["square"]})
    result = Trainer(config).run()
    assert result.output_paths == [output]
    adapter = _loaded(tiny_cog)
    adapter.load_text_encoder("cpu", torch.float32)
    tokenizer, encoder = adapter.text_parts()["text_encoder"]
    start = encoder.get_input_embeddings().weight[tokenizer("square", add_special_tokens=False).input_ids].float().mean(0)
    placeholders = load_embedding(output, tokenizer, encoder)
    assert placeholders.tokens == ["<concept>"]
    assert not torch.allclose(placeholders.rows[0].float(), start, atol=1e-4)  # the row trained


def test_validation_loss_and_samples_during_training(tiny_cog: Path, tmp_path: Path) -> None:
    data = tmp_path / "two"
    data.mkdir()
    for name, caption in (("a", "a square moving"), ("b", "a box at rest")):
        make_clip(data / f"{name}.mp4", width=64, height=64, fps=16, seconds=1.0)
        (data / f"{name}.txt").write_text(caption, encoding="utf-8")
    config = cog_config(tiny_cog, data, tmp_path, max_steps=2,
                        validation={"every_n_steps": 2, "holdout_fraction": 0.5},
                        sampling={"every_n_steps": 2, "prompts": ["a cat"], "width": 64, "height": 64, "frames": 9,
                                  "inference_steps": 2})
    result = Trainer(config).run()
    assert result.steps == 2
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    values = [r["val_loss"] for r in records if "val_loss" in r]
    assert values and all(v == v and 0 < v < 100 for v in values)  # finite, positive
    assert list((tmp_path / "workspace" / "samples").glob("step-000002-*.mp4"))
