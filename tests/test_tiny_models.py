"""The tiny-model builder: folders the real diffusers pipelines load and run, built offline."""

from __future__ import annotations

import os

# Everything here must work without the network; set before diffusers/transformers are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.models import tiny
from core.models.tiny import TINY_FAMILIES, build_tiny_model, folder_size

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

logger = logging.getLogger(__name__)

MAX_FOLDER_BYTES = 5 * 1024 * 1024
PROMPT = "a red square moving left across a blue background"

PIPELINES = {
    "wan21": "WanPipeline",
    "wan22_ti2v_5b": "WanPipeline",
    "wan22_a14b": "WanPipeline",
    "wan22_a14b_i2v": "WanImageToVideoPipeline",
    "hunyuan_video": "HunyuanVideoPipeline",
    "hunyuan_video_i2v": "HunyuanVideoImageToVideoPipeline",
    "cogvideox": "CogVideoXPipeline",
    "cogvideox_i2v": "CogVideoXImageToVideoPipeline",
    "cogvideox15": "CogVideoXPipeline",
    "cogvideox15_i2v": "CogVideoXImageToVideoPipeline",
    "hidream": "HiDreamImagePipeline",
}
# Smallest sizes that still exercise every level of the VAE and more than one latent patch.
VIDEO_CALLS = {
    "wan21": dict(height=32, width=32, num_frames=5),
    "wan22_ti2v_5b": dict(height=64, width=64, num_frames=5),  # 16x VAE: 4x4 latents
    "wan22_a14b": dict(height=32, width=32, num_frames=5),
    "wan22_a14b_i2v": dict(height=32, width=32, num_frames=5),
    "hunyuan_video": dict(height=32, width=32, num_frames=5),
    "hunyuan_video_i2v": dict(height=32, width=32, num_frames=5),
    "cogvideox": dict(height=32, width=32, num_frames=9),  # CogVideoX's VAE round-trips 8k+1 frames
    "cogvideox_i2v": dict(height=64, width=64, num_frames=9),  # its learned positions: one size only
    "cogvideox15": dict(height=32, width=32, num_frames=9),
    "cogvideox15_i2v": dict(height=32, width=32, num_frames=9),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every family built once for the module (with seed 0)."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("tiny")
    folders = {}
    for family in TINY_FAMILIES:
        started = time.perf_counter()
        folders[family] = build_tiny_model(family, root / family, seed=0)
        logger.info(
            "%s: built in %.1f s, %.2f MB", family, time.perf_counter() - started, folder_size(folders[family]) / 1e6
        )
    return folders


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / component).glob("*.safetensors"))
    assert files, f"no safetensors in {folder / component}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(safetensors_torch.load_file(f))
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_folder_layout(built, family):
    folder = built[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family]
    components = [name for name, value in index.items() if isinstance(value, list) and value[0] is not None]
    assert components
    for name in components:
        assert (folder / name).is_dir(), f"{name}/ missing"
    for name in components:
        if name.startswith(("transformer", "vae", "text_encoder")):
            assert list((folder / name).glob("*.safetensors")), f"{name} has no safetensors weights"
            assert not list((folder / name).glob("*.bin"))
    assert folder_size(folder) < MAX_FOLDER_BYTES
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name], "temporary folder left behind"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pipeline_loads_and_runs(built, family):
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(built[family])
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)

    # Every id a tokenizer can produce has an embedding row in its text encoder.
    for name, tokenizer in pipe.components.items():
        if name.startswith("tokenizer"):
            encoder = pipe.components[name.replace("tokenizer", "text_encoder")]
            config = getattr(encoder.config, "text_config", encoder.config)  # Llava: its language model's
            assert config.vocab_size >= len(tokenizer), name

    if family == "wan22_a14b":
        assert pipe.transformer_2 is not None
        assert pipe.config.boundary_ratio == 0.875
        # Two experts of the same shape with their own weights.
        a, b = pipe.transformer.state_dict(), pipe.transformer_2.state_dict()
        assert a.keys() == b.keys()
        assert any(not torch.equal(a[k], b[k]) for k in a)
    if family == "wan22_a14b_i2v":
        assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.9
        # Noisy latents + first-frame mask (one channel per frame of a latent frame) + image latents.
        assert pipe.transformer.config.in_channels == 2 * pipe.vae.config.z_dim + pipe.vae.config.scale_factor_temporal
        assert pipe.transformer.config.out_channels == pipe.vae.config.z_dim
    elif family.startswith("wan"):
        assert pipe.transformer.config.in_channels == pipe.vae.config.z_dim
        assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    if family == "wan22_ti2v_5b":
        assert pipe.config.expand_timesteps is True
        assert pipe.vae.config.z_dim == 48
        assert pipe.vae.config.scale_factor_spatial == 16
        assert pipe.vae.config.scale_factor_temporal == 4
        assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == 48

    if family == "hidream":
        # HiDreamImagePipeline rescales every request to (default_sample_size * vae_scale_factor)^2 pixels,
        # i.e. about 1 MP whatever height/width say; this instance attribute is the only way to go smaller.
        pipe.default_sample_size = 8
        out = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=generator, output_type="np")
        images = out.images
        assert images.shape == (1, 64, 64, 3)
        assert torch.isfinite(torch.from_numpy(images)).all()
        return

    call = dict(VIDEO_CALLS[family])
    if family.startswith("cogvideox"):
        image_to_video = PIPELINES[family] == "CogVideoXImageToVideoPipeline"
        # Noisy latents, then the image latents, on the channel axis; 1.5 patches time by 2.
        assert pipe.transformer.config.in_channels == (2 if image_to_video else 1) * pipe.vae.config.latent_channels
        assert (pipe.transformer.config.patch_size_t == 2) == family.startswith("cogvideox15")
        assert (pipe.transformer.config.ofs_embed_dim is not None) == (family == "cogvideox15_i2v")
        if image_to_video:
            from PIL import Image

            call["image"] = Image.new("RGB", (call["width"], call["height"]), (200, 30, 30))
    if family == "hunyuan_video_i2v":
        from PIL import Image

        # token_replace: the image's latents take the first frame, so the transformer takes 16 channels.
        assert pipe.transformer.config.image_condition_type == "token_replace"
        assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels
        call["image"] = Image.new("RGB", (call["width"], call["height"]), (200, 30, 30))
    if family == "wan22_a14b_i2v":
        from PIL import Image

        call["image"] = Image.new("RGB", (call["width"], call["height"]), (200, 30, 30))
        # diffusers 0.42's image-to-video pipeline cleans captions with ftfy without checking that it
        # is installed; embeddings skip that path (the adapter's sampler does the same).
        from diffusers import WanPipeline

        text_pipe = WanPipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.scheduler)
        call["prompt_embeds"], call["negative_prompt_embeds"] = text_pipe.encode_prompt(PROMPT, "")
        out = pipe(num_inference_steps=2, generator=generator, output_type="np", **call)
    else:
        out = pipe(prompt=PROMPT, num_inference_steps=2, generator=generator, output_type="np", **call)
    frames = out.frames
    assert frames.shape == (1, call["num_frames"], call["height"], call["width"], 3)
    assert torch.isfinite(torch.from_numpy(frames)).all()


def test_hunyuan_i2v_prompt_places_the_image_and_survives_the_crops(built):
    """The I2V pipeline widens the template's <image> at position 5 to 576 tokens, drops the first 103
    positions and the 4 before the assistant's reply: they must be exactly the template's."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["hunyuan_video_i2v"] / "tokenizer")
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    prefix_ids = tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix_ids) == crop
    assert prefix_ids.index(tokenizer.convert_tokens_to_ids("<image>")) == DEFAULT_PROMPT_TEMPLATE["image_emb_start"]
    ids = tokenizer(template.format(PROMPT)).input_ids
    assert ids[:crop] == prefix_ids
    assert tokenizer.convert_ids_to_tokens(ids[-5:]) == ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"]
    assert tokenizer.decode(ids[crop:-5], skip_special_tokens=True).strip() == PROMPT
    assert tokenizer.unk_token_id not in ids


def test_hunyuan_prompt_survives_the_template_crop(built):
    """The pipeline drops the first 95 text positions (crop_start); they must be exactly the template."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
        DEFAULT_PROMPT_TEMPLATE,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["hunyuan_video"] / "tokenizer")
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    prefix_ids = tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix_ids) == crop
    ids = tokenizer(template.format(PROMPT)).input_ids
    assert ids[:crop] == prefix_ids
    assert tokenizer.decode(ids[crop:], skip_special_tokens=True) == PROMPT
    assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize(
    ("family", "subfolder"),
    [
        ("wan21", "tokenizer"),
        ("hunyuan_video", "tokenizer"),
        ("hunyuan_video", "tokenizer_2"),
        ("hidream", "tokenizer_3"),
        ("hidream", "tokenizer_4"),
    ],
)
def test_tokenizers_load_with_autotokenizer(built, family, subfolder):
    """Each tokenizer folder loads on its own and round-trips a caption without unknown pieces."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[family] / subfolder)
    ids = tokenizer(PROMPT).input_ids
    assert len(ids) >= len(PROMPT.split())
    assert max(ids) < len(tokenizer)
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == PROMPT


@pytest.mark.numerics  # random init through the CPU's kernels: docs/testing.md
def test_same_seed_same_weights(built, tmp_path):
    again = build_tiny_model("wan22_a14b", tmp_path / "again", seed=0)
    other = build_tiny_model("wan22_a14b", tmp_path / "other", seed=1)
    for component in ("transformer", "transformer_2", "vae", "text_encoder"):
        first, second = _weights(built["wan22_a14b"], component), _weights(again, component)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), component
        third = _weights(other, component)
        assert any(not torch.equal(first[k], third[k]) for k in first), f"seed 1 gave seed 0's {component}"
        # ...by far more than another CPU's kernels could make of seed 0 (_same_build's tolerance).
        drawn = [k for k in first if not torch.equal(first[k], third[k])]
        assert not [k for k in drawn if _same_build(first[k], third[k])], component
    tok = (built["wan22_a14b"] / "tokenizer" / "tokenizer.json").read_bytes()
    assert tok == (again / "tokenizer" / "tokenizer.json").read_bytes()


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError) as err:
        build_tiny_model("sdxl", tmp_path / "x")
    for family in TINY_FAMILIES:
        assert family in str(err.value)
    assert not (tmp_path / "x").exists()


def test_existing_folder_is_never_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_model("wan21", out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_existing_empty_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert build_tiny_model("wan21", out) == out.absolute()
    assert (out / "model_index.json").is_file()


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    from core.models.tiny import wan

    def broken(out: Path, seed: int) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(wan, "build_wan21", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_tiny_model("wan21", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_load_torch():
    code = "import sys, core.models.tiny as t; assert t.TINY_FAMILIES; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert tiny.__name__ == "core.models.tiny"


# The random initialisation is drawn from the same bits on every CPU, but turned into values by kernels
# compiled per CPU capability (ATEN_CPU_CAPABILITY): uniform_'s x * (to - from) + from is one fused
# multiply-add or two roundings, normal_'s Box-Muller uses vectorised (SLEEF) or libm log/cos, its
# angle rounded in float or double. Each of those few roundings moves a value by at most about an
# ulp of the tensor's largest magnitude; measured: up to 1 ulp (uniform) and 4 ulps (normal) between
# the default and AVX2 kernels. Another seed or another architecture changes values by their own size.
BUILD_ULPS = 16


def _same_build(ours: torch.Tensor, fresh: torch.Tensor) -> bool:
    """Equal, or for floats within BUILD_ULPS ulps of the tensor's largest magnitude."""
    if ours.dtype != fresh.dtype or ours.shape != fresh.shape:
        return False
    if not ours.is_floating_point():
        return torch.equal(ours, fresh)
    tolerance = BUILD_ULPS * torch.finfo(ours.dtype).eps * ours.abs().max().double()
    return bool((ours.double() - fresh.double()).abs().max() <= tolerance)


@pytest.mark.numerics  # random init through the CPU's kernels: docs/testing.md
def test_bundled_demo_model_is_what_the_command_builds(built):
    """resources/tiny_wan21 (the demo preset's model) is `tiny-model --family wan21`, seed 0 (to the
    rounding of the CPU's kernels), and the demo preset's relative path reaches it through the normal
    preset loading."""
    from diffusers import WanPipeline

    from core.config import load_preset

    bundled = Path(load_preset("#demo tiny wan LoRA")["base_model"])
    assert bundled == Path(__file__).resolve().parent.parent / "resources" / "tiny_wan21"
    for component in ("transformer", "vae", "text_encoder"):
        ours, fresh = _weights(bundled, component), _weights(built["wan21"], component)
        assert ours.keys() == fresh.keys()
        assert [k for k in ours if not _same_build(ours[k], fresh[k])] == [], component
    assert (bundled / "tokenizer" / "tokenizer.json").read_bytes() == (built["wan21"] / "tokenizer" / "tokenizer.json").read_bytes()
    assert WanPipeline.from_pretrained(bundled).transformer is not None
