"""Where a model comes from: a local diffusers folder, a Hugging Face hub id (the local cache, or a
download into it), or a single-file transformer checkpoint in transformer.model_path."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.errors import ConfigError
from core.models import registry
from core.models.base import SampleRequest
from core.models.wan import WanAdapter


@pytest.fixture(scope="module")
def wan21(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan21")


# diffusers -> the original Wan release's names: the inverse of diffusers' convert_wan_transformer_to_diffusers.
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
    ("norm2", "norm__swap"),
    ("norm3", "norm2"),
    ("norm__swap", "norm3"),
)


def _original_name(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    key = key.replace(".scale_shift_table", ".modulation")
    for old, new in _TO_ORIGINAL:
        key = key.replace(old, new)
    return key


def _changed_weights(wan21: Path) -> dict[str, torch.Tensor]:
    """The tiny transformer's weights, every one changed, so a load from the file is told apart."""
    adapter = WanAdapter(wan21)
    model = adapter.load_transformer("transformer", "cpu", torch.float32)
    return {k: (v * 1.5 + 0.01).contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("names", ["diffusers", "original", "comfy"])
def test_a_single_file_checkpoint_replaces_the_folders_transformer(wan21: Path, tmp_path: Path, names: str) -> None:
    weights = _changed_weights(wan21)
    if names == "original":
        stored = {_original_name(k): v for k, v in weights.items()}
    elif names == "comfy":  # ComfyUI saves the original names under model.diffusion_model.
        stored = {"model.diffusion_model." + _original_name(k): v for k, v in weights.items()}
    else:
        stored = weights
    assert names == "diffusers" or "blocks.0.self_attn.q.weight" in {k.removeprefix("model.diffusion_model.") for k in stored}
    file = tmp_path / "finetuned.safetensors"
    save_file(stored, str(file))

    loaded = WanAdapter(wan21).load_transformer("transformer", "cpu", torch.float32, checkpoint=str(file)).state_dict()
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key], value, msg=key)


def test_a_bad_single_file_checkpoint_is_one_clear_error(wan21: Path, tmp_path: Path) -> None:
    adapter = WanAdapter(wan21)
    cases = {"missing": tmp_path / "nope.safetensors", "not safetensors": tmp_path / "model.ckpt"}
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    wrong = tmp_path / "other-size.safetensors"
    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(3, 3)}, str(wrong))
    cases["wrong model"] = wrong
    for what, file in cases.items():
        with pytest.raises(ConfigError) as info:
            adapter.load_transformer("transformer", "cpu", torch.float32, checkpoint=str(file))
        assert info.value.key == "transformer.model_path", what
        assert str(file) in str(info.value) and "\n" not in str(info.value), what


def test_a_hub_id_comes_from_the_local_cache(wan21: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--Wan-AI--Tiny-Wan" / "snapshots" / ("a" * 40)
    shutil.copytree(wan21, snapshot)
    (cache / "models--Wan-AI--Tiny-Wan" / "refs").mkdir()
    (cache / "models--Wan-AI--Tiny-Wan" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert registry.resolve_model_folder("Wan-AI/Tiny-Wan") == snapshot
    assert registry.detect_family(snapshot) == "wan21"


def test_a_hub_id_not_in_the_cache_offline_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as info:
        registry.resolve_model_folder("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    assert info.value.key == "base_model" and "not in the local Hugging Face cache" in str(info.value)


def test_a_hub_id_not_in_the_cache_is_downloaded_or_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[dict] = []

    def fake_download(repo_id: str, **kwargs: object) -> str:  # the network is never touched in tests
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        if repo_id == "Wan-AI/Gone":
            raise OSError("Repository Not Found for url: https://huggingface.co/api/models/Wan-AI/Gone\nmore details")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert registry.resolve_model_folder("Wan-AI/Tiny") == tmp_path
    assert calls[-1].get("allow_patterns") and "model_index.json" in calls[-1]["allow_patterns"]
    with pytest.raises(ConfigError) as info:
        registry.resolve_model_folder("Wan-AI/Gone")
    assert info.value.key == "base_model" and "Repository Not Found" in str(info.value) and "\n" not in str(info.value)


def test_sampling_runs_the_familys_pipeline_around_the_trained_denoiser(wan21: Path) -> None:
    from peft import LoraConfig

    adapter = WanAdapter(wan21)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32)
    request = SampleRequest("a red circle", width=30, height=34, frames=6, steps=2, guidance_scale=1.0, seed=5)
    args = {"device": "cpu", "dtype": torch.float32}
    video = adapter.sample({"transformer": transformer}, request, **args)
    assert video.dtype.name == "uint8" and video.shape == (5, 32, 16, 3)  # 4k+1 frames, multiples of 16
    again = adapter.sample({"transformer": transformer}, request, **args)
    assert (video == again).all(), "a seed must give the same sample"

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=adapter.default_lora_targets()))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a LoRA that has learned something
    transformer.train()
    changed = adapter.sample({"transformer": transformer}, request, **args)
    assert (changed != video).any(), "the sample must come from the model as it is now"
    assert transformer.training, "sampling must leave the training mode as it was"
