"""FINE_TUNE of HiDream on the tiny model: every transformer weight trains (the routed experts and the
MoE gates included), the result is a diffusers folder HiDreamImagePipeline.from_pretrained loads with
the other components as they were; fine-tuning an encoder is refused by name; the preset trains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_hidream import PRESETS, hd_config

from core.config import list_presets, load_preset, resolve
from core.errors import ConfigError
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_hd(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hidream")


@pytest.fixture
def one_image(tmp_path: Path) -> Path:
    from media_factory import make_image

    folder = tmp_path / "image"
    folder.mkdir()
    make_image(folder / "image.png", width=64, height=64, index=3)
    (folder / "image.txt").write_text("a gray square with a marker", encoding="utf-8")
    return folder


def _changed(a: torch.nn.Module, b: torch.nn.Module) -> set[str]:
    theirs = dict(b.named_parameters())
    return {n for n, p in a.named_parameters() if not torch.equal(p, theirs[n])}


def test_finetune_saves_a_folder_the_pipeline_loads(tiny_hd: Path, one_image: Path, tmp_path: Path) -> None:
    from diffusers import HiDreamImagePipeline

    output = tmp_path / "out" / "ft"
    config = hd_config(tiny_hd, one_image, tmp_path, training_method="FINE_TUNE", output_path=str(output),
                       learning_rate=1e-3, optimizer="ADAFACTOR", fused_backward=True, max_grad_norm=0.0)
    result = Trainer(config).run()
    assert result.output_paths == [output] and result.steps == 3
    base, tuned = HiDreamImagePipeline.from_pretrained(tiny_hd), HiDreamImagePipeline.from_pretrained(output)
    changed = _changed(tuned.transformer, base.transformer)
    # Both stacks, attention and experts, and the gates' routing weights (the gates ran with gradients).
    assert any(".attn1.to_q." in n and n.startswith("double_") for n in changed)
    assert any(".ff_i.experts." in n for n in changed) and any(n.endswith(".ff_i.gate.weight") for n in changed)
    assert len(changed) > len(list(base.transformer.parameters())) // 2
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4", "vae"):
        assert not _changed(getattr(tuned, part), getattr(base, part)), part
    tuned.set_progress_bar_config(disable=True)
    tuned.default_sample_size = 4
    image = tuned("a gray square with a marker", num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.parametrize("part", ["text_encoder", "text_encoder_4"])
def test_finetuning_an_encoder_is_refused_by_name(tiny_hd: Path, one_image: Path, tmp_path: Path, part: str) -> None:
    config = hd_config(tiny_hd, one_image, tmp_path, training_method="FINE_TUNE", output_path=str(tmp_path / "ft"),
                       **{part: {"train": True}})
    with pytest.raises(ConfigError) as caught:
        Trainer(config).run()
    assert caught.value.key == f"{part}.train" and "HiDream" in str(caught.value)


def test_the_finetune_preset_trains_the_tiny_model(tiny_hd: Path, one_image: Path, tmp_path: Path) -> None:
    preset = "#hidream Finetune"
    assert preset not in PRESETS  # the LoRA presets' test writes a .safetensors output
    info = {p.name: p for p in list_presets()}[preset]
    assert info.bundled and info.error is None and "images" in info.description
    loaded = load_preset(preset)
    assert loaded["model_type"] == "HIDREAM" and loaded["training_method"] == "FINE_TUNE"
    config = resolve(dict(loaded), {
        "base_model": str(tiny_hd),
        "datasets": [{"path": str(one_image), "repeats": 1}],
        "output_path": str(tmp_path / "out" / "ft"),
        "workspace_dir": str(tmp_path / "workspace"),
        "cache_dir": str(tmp_path / "cache"),
        "dataloader_threads": 0,
        "max_steps": 2,
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 0},
    })
    result = Trainer(config).run()
    assert result.steps == 2 and result.output_paths == [tmp_path / "out" / "ft"]
