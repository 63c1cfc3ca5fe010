"""The Wan adapter's encoders on tiny real models, their identities, and picking the adapter from a config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from core import identity
from core.errors import UserError
from core.models.registry import adapter_for, detect_family
from core.models.wan import WanAdapter

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md


@pytest.fixture(scope="module")
def models(tiny_model: Callable[[str], Path]) -> dict[str, Path]:
    return {family: tiny_model(family) for family in ("wan21", "wan22_ti2v_5b", "wan22_a14b")}


@pytest.fixture(scope="module")
def wan21(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> WanAdapter:
    # A copy without the transformer: loading the encoders must not need it.
    folder = tmp_path_factory.mktemp("no-transformer") / "wan21"
    shutil.copytree(models["wan21"], folder, ignore=shutil.ignore_patterns("transformer"))
    adapter = WanAdapter(folder)
    adapter.load_vae("cpu", torch.float32)
    adapter.load_text_encoder("cpu", torch.float32)
    return adapter


def _frames(seed: int = 0) -> torch.Tensor:
    return torch.rand((1, 3, 9, 64, 64), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_wan21_encodes_without_a_transformer(wan21: WanAdapter) -> None:
    assert not (wan21.folder / "transformer").exists()
    assert (wan21.family, wan21.spatial_ratio, wan21.temporal_ratio, wan21.size_divisor) == ("wan21", 8, 4, 16)
    latents = wan21.encode_video(_frames())
    assert latents.shape == (1, 16, 3, 8, 8)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert wan21.latent_frames(9) == 3 and wan21.latent_channels == 16


def test_latents_are_a_seeded_posterior_sample_normalised_as_the_pipeline_expects(wan21: WanAdapter) -> None:
    frames = _frames(1)
    latents = wan21.encode_video(frames, torch.Generator().manual_seed(7))
    assert torch.equal(latents, wan21.encode_video(frames, torch.Generator().manual_seed(7)))
    assert not torch.equal(latents, wan21.encode_video(frames, torch.Generator().manual_seed(8)))
    vae = wan21._vae
    with torch.no_grad():
        raw = vae.encode(frames).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    # WanPipeline's decode step (latents * std + mean) gives the VAE's own latents back.
    torch.testing.assert_close(latents * std + mean, raw)


def test_ti2v_vae_has_48_channels_and_16x_compression(models: dict[str, Path]) -> None:
    adapter = WanAdapter(models["wan22_ti2v_5b"])
    assert (adapter.family, adapter.spatial_ratio, adapter.temporal_ratio, adapter.size_divisor) == ("wan22_ti2v_5b", 16, 4, 32)
    adapter.load_vae("cpu", torch.float32)
    assert adapter.encode_video(_frames()).shape == (1, 48, 3, 4, 4)


def test_encode_text_matches_wan_pipeline(wan21: WanAdapter) -> None:
    from diffusers import WanPipeline

    captions = ["a cat walks across the street", "a drone shot over mountains at sunset, slow camera pan"]
    out = wan21.encode_text(captions)
    embeds, mask = out["prompt_embeds"], out["prompt_mask"]
    assert embeds.shape == (2, 512, 32) and mask.shape == (2, 512) and mask.dtype == torch.bool
    lengths = mask.sum(dim=1)
    assert 0 < lengths[0] < lengths[1] < 512
    for row, n in enumerate(lengths.tolist()):
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (embeds[row, n:] == 0).all() and (embeds[row, :n].abs().sum(dim=1) > 0).all()
    # The pipeline's own method, run on the same tokenizer and encoder.
    fake_pipe = SimpleNamespace(tokenizer=wan21.text_parts()["text_encoder"][0], text_encoder=wan21.text_parts()["text_encoder"][1], _execution_device=torch.device("cpu"))
    expected = WanPipeline._get_t5_prompt_embeds(fake_pipe, captions, max_sequence_length=512)
    torch.testing.assert_close(embeds, expected)


def test_encoders_must_be_loaded_first(models: dict[str, Path]) -> None:
    adapter = WanAdapter(models["wan21"])
    with pytest.raises(RuntimeError, match="load_vae"):
        adapter.encode_video(_frames())
    with pytest.raises(RuntimeError, match="load_text_encoder"):
        adapter.encode_text(["x"])


def test_identities_are_stable_across_instances_and_processes(models: dict[str, Path]) -> None:
    folder = models["wan21"]
    a, b = WanAdapter(folder), WanAdapter(folder)
    assert a.vae_identity() == b.vae_identity() and a.text_identity() == b.text_identity()
    assert a.vae_identity() != a.text_identity()
    code = (
        "import sys; from core.models.wan import WanAdapter\n"
        "a = WanAdapter(sys.argv[1], family='wan21'); print(a.vae_identity()); print(a.text_identity())\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [a.vae_identity(), a.text_identity()]
    # Different VAEs (Wan 2.1 vs Wan 2.2) have different identities; A14B keeps Wan 2.1's (same seed).
    assert WanAdapter(models["wan22_ti2v_5b"]).vae_identity() != a.vae_identity()


def test_identity_changes_when_a_weight_file_changes(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(models["wan21"], folder)
    before = WanAdapter(folder)
    vae_id, text_id = before.vae_identity(), before.text_identity()
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte different
    weights.write_bytes(bytes(data))
    stat = weights.stat()
    # A new mtime, as any real rewrite gives (the per-process memo is keyed by size and mtime).
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = WanAdapter(folder)
    assert after.vae_identity() != vae_id
    assert after.text_identity() == text_id
    # A config change counts too, but not re-saving it with other formatting.
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config, indent=1, sort_keys=True))
    assert WanAdapter(folder).text_identity() == text_id
    config["dropout_rate"] = 0.5
    config_path.write_text(json.dumps(config))
    assert WanAdapter(folder).text_identity() != text_id


def test_big_files_are_hashed_by_size_head_and_tail(tmp_path: Path) -> None:
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as handle:  # sparse: costs no disk
        handle.truncate(identity.FULL_HASH_LIMIT + 10)
    first = identity.file_digest(big)
    with open(big, "r+b") as handle:
        handle.seek(identity.FULL_HASH_LIMIT // 2)
        handle.write(b"x")  # the middle: not read, by design
    os.utime(big, ns=(0, 10**9))
    assert identity.file_digest(big) == first
    with open(big, "r+b") as handle:
        handle.seek(identity.FULL_HASH_LIMIT + 5)
        handle.write(b"x")
    os.utime(big, ns=(0, 2 * 10**9))
    assert identity.file_digest(big) != first


@pytest.mark.parametrize(
    ("family", "model_type"),
    [("wan21", "WAN_2_1"), ("wan22_ti2v_5b", "WAN_2_2_TI2V_5B"), ("wan22_a14b", "WAN_2_2_A14B_T2V")],
)
def test_registry_detects_the_family(models: dict[str, Path], family: str, model_type: str) -> None:
    assert detect_family(models[family]) == family
    for chosen in ("AUTO", model_type):
        adapter = adapter_for({"model_type": chosen, "base_model": str(models[family])})
        assert isinstance(adapter, WanAdapter) and adapter.family == family


def test_registry_rejects_a_contradicting_model_type(models: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="WAN_2_2_TI2V_5B.*Wan 2.1.*AUTO or WAN_2_1"):
        adapter_for({"model_type": "WAN_2_2_TI2V_5B", "base_model": str(models["wan21"])})
    with pytest.raises(UserError, match="WAN_2_1.*A14B"):
        adapter_for({"model_type": "WAN_2_1", "base_model": str(models["wan22_a14b"])})


def test_registry_explains_missing_or_invalid_folders(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"{missing}.*does not exist.*model_index.json"):
        adapter_for({"model_type": "AUTO", "base_model": str(missing)})
    with pytest.raises(UserError, match="no model_index.json"):
        adapter_for({"model_type": "AUTO", "base_model": str(tmp_path)})
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be read"):
        adapter_for({"model_type": "AUTO", "base_model": str(tmp_path)})
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(UserError, match="single file.*transformer.model_path"):
        adapter_for({"model_type": "AUTO", "base_model": str(single)})
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):  # tests run with HF_HUB_OFFLINE=1
        adapter_for({"model_type": "AUTO", "base_model": "nobody/not-a-cached-model"})
    with pytest.raises(UserError, match="does not exist"):
        adapter_for({"model_type": "AUTO", "base_model": str(tmp_path / "nobody" / "nothing")})


def test_other_families_are_not_supported_yet(tmp_path: Path) -> None:
    # Wan 2.1's image-to-video folders (a CLIP image encoder) are recognised, not trained.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline",
                                                           "image_encoder": ["transformers", "CLIPVisionModel"]}))
    with pytest.raises(UserError, match="Wan 2.1 image-to-video model, which is not supported yet for training"):
        adapter_for({"model_type": "AUTO", "base_model": str(tmp_path)})
    # HunyuanVideo-I2V folders train now (tests/test_hunyuan_video_i2v.py): the same adapter, its I2V family.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoImageToVideoPipeline"}))
    assert adapter_for({"model_type": "AUTO", "base_model": str(tmp_path)}).family == "hunyuan_video_i2v"
    # A pipeline the table does not know at all.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomeOtherPipeline"}))
    with pytest.raises(UserError, match="SomeOtherPipeline, which this app does not know"):
        adapter_for({"model_type": "AUTO", "base_model": str(tmp_path)})
