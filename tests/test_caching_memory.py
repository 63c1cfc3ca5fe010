"""Caching at real sizes: the Hunyuan Video VAE encodes in tiles (diffusers' enable_tiling), the
estimate counts the caching phase (one tile's tensors, the text encoders together) beside the
training step's, and lists the model's parts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.config import resolve
from core.config.presets import load_preset
from core.memory.estimate import GIB, estimate_memory
from core.memory.known_models import VAE_ENCODE_TILES, configs_from_folder
from core.memory.part_sizes import vae_encode_activation_bytes
from core.memory.probe import TensorMemoryProbe
from core.models.hunyuan_video import HunyuanVideoAdapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
# Tiles of 48 pixels 32 apart: 6 latent cells 4 apart, blended over 2, so they kick in at tiny sizes.
SMALL_TILES = {"height": 48, "width": 48, "stride_height": 32, "stride_width": 32}


def _clip(frames: int, height: int, width: int) -> torch.Tensor:
    """A smooth (1, 3, F, H, W) clip in [-1, 1] that moves from frame to frame."""
    y = torch.linspace(-1, 1, height)[:, None]
    x = torch.linspace(-1, 1, width)[None, :]
    video = [torch.stack([torch.sin(3 * x + f / 3) * torch.cos(2 * y), torch.cos(4 * y - f / 5) * x, x * y])
             for f in range(frames)]
    return torch.stack(video, dim=1)[None].clamp(-1, 1)


@pytest.fixture(scope="module")
def adapter(tiny_model: Callable[[str], Path]) -> HunyuanVideoAdapter:
    return HunyuanVideoAdapter(tiny_model("hunyuan_video"))


def _mode(vae, frames: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(frames).latent_dist.mode()


def test_the_vae_encodes_with_diffusers_tiles_as_the_adapter_names_them(tiny_model: Callable[[str], Path]) -> None:
    vae = HunyuanVideoAdapter(tiny_model("hunyuan_video")).load_vae("cpu", torch.float32)
    tiles = VAE_ENCODE_TILES["AutoencoderKLHunyuanVideo"]
    assert vae.use_tiling and vae.use_slicing and vae.use_framewise_encoding
    assert (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_min_num_frames) == (
        tiles["height"], tiles["width"], tiles["frames"])
    assert (vae.tile_sample_stride_height, vae.tile_sample_stride_width) == (tiles["stride_height"], tiles["stride_width"])


def test_a_clip_within_one_tile_encodes_exactly_as_untiled(tiny_model: Callable[[str], Path]) -> None:
    adapter = HunyuanVideoAdapter(tiny_model("hunyuan_video"))
    adapter.vae_tiles.update(SMALL_TILES)
    vae = adapter.load_vae("cpu", torch.float32)
    clip = _clip(5, 48, 48)
    tiled = adapter.encode_video(clip)
    vae.disable_tiling()
    assert torch.equal(tiled, adapter.encode_video(clip))


def test_tiles_kick_in_and_blend_as_diffusers_documents(tiny_model: Callable[[str], Path]) -> None:
    """Above one tile: each tile is encoded on its own, so the cells no neighbour overlaps are exactly
    that tile's own encoding, and the overlap is the linear cross-fade of the two tiles' cells."""
    adapter = HunyuanVideoAdapter(tiny_model("hunyuan_video"))
    adapter.vae_tiles.update(SMALL_TILES)
    vae = adapter.load_vae("cpu", torch.float32)
    clip = _clip(5, 32, 80)  # one row (32 pixels, within a stride) of tiles at pixels 0-48, 32-80 and 64-80
    tiled = _mode(vae, clip)
    vae.disable_tiling()
    untiled = _mode(vae, clip)
    left, right = _mode(vae, clip[..., 0:48]), _mode(vae, clip[..., 32:80])
    assert tiled.shape == untiled.shape == (1, 16, 2, 4, 10)
    # The first tile's cells up to the stride (4 cells), the second's after its blend (cells 4 + 2 to 8).
    assert torch.equal(tiled[..., :4], left[..., :4])
    assert torch.equal(tiled[..., 6:8], right[..., 2:4])
    # Blend width 6 - 4 = 2 cells: weight x / 2 of the right tile at its cell x.
    for x in range(2):
        expected = left[..., 4 + x] * (1 - x / 2) + right[..., x] * (x / 2)
        torch.testing.assert_close(tiled[..., 4 + x], expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps * expected.abs().max())
    # And the tiles did change the latents: a tile sees only its own pixels (GroupNorm, attention).
    assert not torch.allclose(tiled, untiled)


def test_tiled_encoding_needs_one_tiles_memory_as_the_estimate_counts(tiny_model: Callable[[str], Path]) -> None:
    adapter = HunyuanVideoAdapter(tiny_model("hunyuan_video"))
    adapter.vae_tiles.update(SMALL_TILES)
    vae = adapter.load_vae("cpu", torch.float32)
    config = json.loads((tiny_model("hunyuan_video") / "vae" / "config.json").read_text())
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    measured = {}
    for tiled in (True, False):
        if not tiled:
            vae.disable_tiling()
        clip = _clip(9, 144, 144)  # nine tiles
        with TensorMemoryProbe().track(vae, clip) as probe:
            _mode(vae, clip)
        measured[tiled] = probe.peak["cpu"] - weights - clip.numel() * clip.element_size()
        tiles = {**VAE_ENCODE_TILES["AutoencoderKLHunyuanVideo"], **SMALL_TILES, "spatial": int(tiled)}
        formula = vae_encode_activation_bytes(config, tiles, 9, 144, 144, 4)
        # The formula counts a little more than is alive at the peak (part_sizes.ENCODE_LIVE), never less.
        assert measured[tiled] <= formula <= 1.3 * measured[tiled], (tiled, measured[tiled], formula)
    assert measured[True] < measured[False] / 3


def test_the_estimate_reports_the_caching_phase_and_the_parts(tiny_model: Callable[[str], Path]) -> None:
    folder = tiny_model("hunyuan_video")
    out = subprocess.run([sys.executable, "main.py", "estimate", "--set", f"base_model={folder}", "--set", "model_type=HUNYUAN_VIDEO",
                          "--vram", "24"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    estimate = estimate_memory(resolve({"base_model": str(folder), "model_type": "HUNYUAN_VIDEO"}))
    assert "caching" in out and "tiled" in out and f"the higher phase: {estimate.phase}" in out
    for part in ("text_encoder  ", "text_encoder_2", "vae  "):
        assert part in out
    configs = configs_from_folder(folder)
    # Parameters from the files' headers: the same counts the loaded models have.
    adapter = HunyuanVideoAdapter(folder)
    adapter.load_text_encoder("cpu", torch.float32, name="text_encoder_2")
    clip = adapter.text_parts()["text_encoder_2"][1]
    assert configs.parameters["text_encoder_2"] == sum(p.numel() for p in clip.parameters())
    assert configs.parameters["vae"] == sum(p.numel() for p in adapter.load_vae("cpu", torch.float32).parameters())


def test_a_720p_clip_caches_within_24_gb_because_its_vae_tiles() -> None:
    config = resolve(load_preset("#hunyuan video LoRA"), {"resolution": 720, "frames": 65, "video_config": {"max_frames": 65}})
    estimate = estimate_memory(config)
    caching = estimate.details["caching"]
    assert caching["tiled"] and not caching["unsized"]
    assert estimate.caching_needed_bytes < 24 * GIB and caching["text"] > caching["vae"]  # the 8 B Llama is the larger stage
    vae = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16}
    untiled = {**VAE_ENCODE_TILES["AutoencoderKLHunyuanVideo"], "spatial": 0}
    # A 1280 x 720 clip, in float32 (the VAE's default weight_dtype): one 17-frame chunk untiled would not
    # fit; tiled, it needs one 256-pixel tile's tensors.
    assert vae_encode_activation_bytes(vae, untiled, 65, 720, 1280, 4) > 24 * GIB
    assert vae_encode_activation_bytes(vae, VAE_ENCODE_TILES["AutoencoderKLHunyuanVideo"], 65, 720, 1280, 4) < 3 * GIB
    parts = {p["name"]: p for p in estimate.details["parts"]}
    assert parts["text_encoder"]["kind"] == "llama" and 7.4e9 < parts["text_encoder"]["parameters"] < 7.6e9
    assert parts["text_encoder_2"]["kind"] == "clip_text_model" and 1.2e8 < parts["text_encoder_2"]["parameters"] < 1.25e8


@pytest.mark.parametrize("family", ["hunyuan_video", "hunyuan_video_i2v", "cogvideox", "wan21"])
def test_the_config_layouts_count_what_the_files_hold(tiny_model: Callable[[str], Path], family: str) -> None:
    """Each text encoder sized from its config.json alone (Llama, CLIP text, Llava, T5, UMT5) has the
    parameters its safetensors files hold: the layouts the built-in configs are sized by."""
    from core.memory.part_sizes import text_encoder_part

    configs = configs_from_folder(tiny_model(family))
    assert configs.encoders()
    for name, config in configs.encoders().items():
        part = text_encoder_part(name, config)
        assert part is not None and part.parameters == configs.parameters[name], (family, name, part)


def test_a_stage_not_sized_says_so_instead_of_zero() -> None:
    """CogVideoX's built-in configs size its text encoder (T5-v1.1-XXL) for caching but not its VAE:
    the VAE stage says "not sized" rather than a 0.00 GiB that reads as free, and the phase line says
    it compares what is sized. (Wan's VAE is sized: tests/test_wan_vae_memory.py.)"""
    out = subprocess.run([sys.executable, "main.py", "estimate", "--preset", "#cogvideox LoRA 12GB", "--vram", "12"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    caching = next(line for line in out.splitlines() if line.strip().startswith("caching"))
    assert "VAE not sized" in caching and "0.00 GiB" not in caching and "not counted: vae weights, vae activations" in caching
    assert "the higher phase: caching, of what is sized" in out and "fits in 12.0 GiB" in out
    estimate = estimate_memory(resolve(load_preset("#cogvideox LoRA 12GB")))
    assert 0 < estimate.details["caching"]["text"] and estimate.caching_needed_bytes < 12 * GIB


# The real encoders' proportions at a small width: UMT5-XXL / T5-v1.1-XXL (heads x d_kv = d_model,
# d_ff = 2.5 d_model, 24 layers, 64 heads at 4096: here heads x tokens / d_model as at 512 tokens)
# and Hunyuan Video's Llama 3 8B (32 layers, 8 KV heads for 32 query heads: 2 for 8 here).
T5_LIKE = {"d_model": 256, "d_ff": 640, "d_kv": 64, "num_heads": 4, "num_layers": 24, "vocab_size": 300,
           "feed_forward_proj": "gated-gelu"}
LLAMA_LIKE = {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 32, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300}


def _encode_peak(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> int:
    """Bytes alive at the peak of one encoding without autograd, beyond the weights and the ids."""
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad(), TensorMemoryProbe().track(model, ids) as probe:
        model(ids, **kwargs)
    return probe.peak["cpu"] - held - ids.numel() * ids.element_size()


@pytest.mark.parametrize("kind, tokens", [("umt5", 512), ("t5", 226), ("llama", 256)])
def test_the_text_stage_counts_what_an_encoding_keeps_alive(kind: str, tokens: int) -> None:
    """The adapters' own calls (Wan / CogVideoX: the last hidden state of T5; Hunyuan Video / HiDream:
    every hidden state of the Llama, with its KV cache off as loading.no_kv_cache leaves it) on the
    real classes: the formula holds the measured peak, and counts at most 30 % more."""
    import transformers

    from core.memory.part_sizes import text_encoder_part
    from core.models.loading import no_kv_cache

    torch.manual_seed(0)
    if kind == "llama":
        config = LLAMA_LIKE
        model = transformers.LlamaModel(transformers.LlamaConfig(**config)).eval()
        no_kv_cache(model)
        assert model.config.use_cache is False
        call = {"output_hidden_states": True}
    else:
        config = T5_LIKE
        classes = {"umt5": (transformers.UMT5EncoderModel, transformers.UMT5Config),
                   "t5": (transformers.T5EncoderModel, transformers.T5Config)}[kind]
        model = classes[0](classes[1](**config)).eval()
        call = {}
    batch = 2
    measured = _encode_peak(model, torch.randint(0, 300, (batch, tokens)), **call)
    formula = text_encoder_part("text_encoder", {"model_type": kind, **config}).caching_activation_bytes(tokens, batch, 4)
    assert measured <= formula <= 1.3 * measured, (kind, measured, formula)


def test_the_loaded_llama_keeps_no_kv_cache(tiny_model: Callable[[str], Path]) -> None:
    adapter = HunyuanVideoAdapter(tiny_model("hunyuan_video"))
    llama = adapter.load_text_encoder("cpu", torch.float32, name="text_encoder")
    with torch.no_grad():
        out = llama(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert out.past_key_values is None and len(out.hidden_states) == llama.config.num_hidden_layers + 1
