"""The Wan VAE (diffusers' AutoencoderKLWan) in the caching estimate: its weights from the built-in
configs and a folder's files, its encoding's peak (core/memory/wan_vae_sizes.py) measured with
TensorMemoryProbe on the class itself, and the Wan presets' caching lines that count both."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from core.memory.known_models import WAN21_VAE, WAN22_VAE, configs_from_folder
from core.memory.probe import TensorMemoryProbe
from core.memory.wan_vae_sizes import AUTOENCODER_KL_WAN_DEFAULTS, wan_vae_encode_activation_bytes
from core.models.wan import WanAdapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
NOT_INIT_ARGUMENTS = ("_class_name", "parameters")


def _init_arguments(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_INIT_ARGUMENTS}


# The built-in layouts at a small width: Wan 2.1's (four levels of 1, 2, 4, 4 widths, two residual
# blocks each) and Wan 2.2 TI2V-5B's (the same with residual down blocks after a 2x2 patchify).
SMALL = {"wan21": {**_init_arguments(WAN21_VAE), "base_dim": 16},
         "wan22": {**_init_arguments(WAN22_VAE), "base_dim": 16, "decoder_base_dim": 16}}


def _clip(frames: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.rand(1, 3, frames, height, width) * 2 - 1).to(dtype)


@pytest.mark.parametrize("config", [WAN21_VAE, WAN22_VAE], ids=["wan21", "wan22"])
def test_the_builtin_configs_count_the_parameters_of_their_class(config: dict[str, Any]) -> None:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan(**_init_arguments(config))
    assert sum(p.numel() for p in vae.parameters()) == config["parameters"]
    assert config["_class_name"] == type(vae).__name__


def test_the_layout_defaults_are_the_class_defaults() -> None:
    """A folder's config.json may leave out what the class defaults: the formula fills in the same."""
    from diffusers import AutoencoderKLWan

    defaults = {n: p.default for n, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()}
    assert {n: defaults[n] for n in AUTOENCODER_KL_WAN_DEFAULTS} == AUTOENCODER_KL_WAN_DEFAULTS


def _measured_and_formula(layout: str, frames: int, height: int, width: int,
                          dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(bytes alive at the peak of the class's encoding beyond its weights, the formula's bytes)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**SMALL[layout]).eval().to(dtype)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    clip = _clip(frames, height, width, dtype)
    with torch.no_grad(), TensorMemoryProbe().track(vae, clip) as probe:
        vae.encode(clip).latent_dist.sample()
    measured = probe.peak["cpu"] - weights  # the clip counts: on the GPU it is the VAE's own copy
    return measured, wan_vae_encode_activation_bytes(dict(vae.config), frames, height, width, clip.element_size())


SIZES = [(9, 64, 64), (17, 64, 96), (5, 128, 128), (1, 64, 64)]  # frames, height, width


@pytest.mark.parametrize("layout", sorted(SMALL))
@pytest.mark.parametrize("frames, height, width", SIZES)
def test_the_encoding_peak_is_counted(layout: str, frames: int, height: int, width: int) -> None:
    """Untiled, as the adapter encodes: the formula holds the measured peak (the clip, the chunk's
    tensors, the feature cache, the moments) and counts at most 30 % more."""
    measured, formula = _measured_and_formula(layout, frames, height, width)
    assert measured <= formula <= 1.3 * measured, (layout, measured, formula)


@pytest.mark.parametrize("layout", sorted(SMALL))
def test_in_half_precision_the_float32_norms_are_counted(layout: str) -> None:
    measured, formula = _measured_and_formula(layout, 17, 64, 96, torch.bfloat16)
    assert measured <= formula <= 1.3 * measured, (layout, measured, formula)


def _adapter_measured_and_formula(folder: Path, frames: int, height: int, width: int) -> tuple[int, int]:
    """The adapter's encode_video of a clip on the folder's VAE in float32: (measured, formula) bytes."""
    adapter = WanAdapter(folder)
    vae = adapter.load_vae("cpu", torch.float32)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    clip = _clip(frames, height, width)
    with TensorMemoryProbe().track(vae, clip) as probe:
        adapter.encode_video(clip)
    measured = probe.peak["cpu"] - weights
    if adapter.image_conditioned:
        # While it encodes the condition video the caller's clip stays where precompute made it,
        # on the CPU: on the GPU one clip-sized video is there at a time, the one being encoded.
        measured -= clip.numel() * clip.element_size()
    config = json.loads((folder / "vae" / "config.json").read_text())
    return measured, wan_vae_encode_activation_bytes(config, frames, height, width, 4)


ADAPTER_FAMILIES = ["wan21", "wan22_ti2v_5b", "wan22_a14b_i2v"]


@pytest.mark.parametrize("family", ADAPTER_FAMILIES)
def test_the_adapters_encoding_of_a_tiny_model_is_counted(tiny_model: Callable[[str], Path], family: str) -> None:
    """The adapter's own call (a posterior sample, normalized; the image-to-video model's second
    encoding of the first frame) on the tiny model's VAE, sized from its folder's config.json, whose
    parameter count comes from its files."""
    folder = tiny_model(family)
    vae = WanAdapter(folder).load_vae("cpu", torch.float32)
    assert configs_from_folder(folder).parameters["vae"] == sum(p.numel() for p in vae.parameters())
    for frames, height, width in SIZES[:2]:
        measured, formula = _adapter_measured_and_formula(folder, frames, height, width)
        assert measured <= formula <= 1.3 * measured, (family, frames, measured, formula)


@pytest.mark.parametrize("preset", ["#wan 2.2 LoRA 8GB", "#wan 2.2 LoRA", "#wan 2.2 Finetune"])
def test_the_wan_presets_caching_lines_count_the_vae(preset: str) -> None:
    from core.config import resolve
    from core.config.presets import load_preset
    from core.memory.estimate import GIB, estimate_memory

    out = subprocess.run([sys.executable, "main.py", "estimate", "--preset", preset, "--vram", "8"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    caching = next(line for line in out.splitlines() if line.strip().startswith("caching"))
    assert "not sized" not in caching and "not counted" not in caching and "VAE " in caching
    assert "vae                not sized" not in out and "AutoencoderKLWan" in out
    estimate = estimate_memory(resolve(load_preset(preset)))
    stages = estimate.details["caching"]
    # Wan 2.2 TI2V-5B's VAE in float32: 704.7 M parameters, and its encoding beside them.
    assert stages["unsized"] == [] and stages["vae"] > 704_688_668 * 4
    if "8GB" in preset:
        assert estimate.caching_needed_bytes < 8 * GIB


if __name__ == "__main__":  # the ratios docs/memory.md quotes: python tests/test_wan_vae_memory.py
    torch.set_num_threads(1)
    for name in sorted(SMALL):
        for dtype, sizes in ((torch.float32, SIZES), (torch.bfloat16, SIZES[1:2])):
            for frames, height, width in sizes:
                measured, formula = _measured_and_formula(name, frames, height, width, dtype)
                print(f"{name} {str(dtype)[6:]} {frames}x{height}x{width}: measured {measured}, formula {formula}, "
                      f"{formula / measured:.3f}x")
    import tempfile

    from core.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as root:
        for family in ADAPTER_FAMILIES:
            folder = build_tiny_model(family, Path(root) / family)
            for frames, height, width in SIZES[:2]:
                measured, formula = _adapter_measured_and_formula(folder, frames, height, width)
                print(f"adapter {family} {frames}x{height}x{width}: measured {measured}, formula {formula}, "
                      f"{formula / measured:.3f}x")
