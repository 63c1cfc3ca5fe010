"""COMFY LoRA files of HiDream: diffusers' own module names under ComfyUI's ``diffusion_model.`` prefix,
read back by diffusers' converter (_convert_non_diffusers_hidream_lora_to_diffusers) into the update
that was trained, and through HiDreamImagePipeline.load_lora_weights into the output the DIFFUSERS
file of the same run gives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from numerics import forward_tolerance

from core.errors import UserError
from core.export.comfy_hidream import diffusers_to_comfy
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_hd(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hidream")


def _updates(state: dict[str, torch.Tensor], scales: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Module -> scale * B @ A."""
    modules = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    return {m: (scales or {}).get(m, 1.0) * state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"] for m in modules}


@pytest.mark.numerics
def test_every_linear_of_the_tiny_model_converts_back_to_its_update(tiny_hd: Path) -> None:
    from diffusers import HiDreamImageTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_hidream_lora_to_diffusers

    model = HiDreamImageTransformer2DModel.from_pretrained(tiny_hd, subfolder="transformer")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"double_stream_blocks.0.block.attn1.to_q_t", "single_stream_blocks.0.block.ff_i.experts.1.w2",
            "caption_projection.0.linear", "final_layer.adaLN_modulation.1", "x_embedder.proj"} <= set(shapes)
    gen = torch.Generator().manual_seed(0)
    state, scales = {}, {}
    for i, (module, (out, inp)) in enumerate(sorted(shapes.items())):
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(3, inp, generator=gen, dtype=torch.float64)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 3, generator=gen, dtype=torch.float64)
        scales[module] = 0.5 + i % 3
    comfy = diffusers_to_comfy(state, scales)
    assert all(k.startswith("diffusion_model.") for k in comfy) and not any(k.endswith(".alpha") for k in comfy)
    assert "diffusion_model.double_stream_blocks.0.block.attn1.to_q.lora_A.weight" in comfy
    back = {k.removeprefix("transformer."): v for k, v in _convert_non_diffusers_hidream_lora_to_diffusers(dict(comfy)).items()}
    ours = _updates({k.removeprefix("transformer."): v for k, v in state.items()}, scales)
    theirs = _updates(back)
    assert set(theirs) == set(ours) == set(shapes)
    for module, update in ours.items():
        torch.testing.assert_close(theirs[module], update, msg=module)  # float64, one product reordered: rounding


def test_a_lora_bias_is_refused_by_module_name() -> None:
    state = {"x.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(4, 2), "x.lora_B.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"^x has a LoRA bias"):
        diffusers_to_comfy(state, {"x": 1.0})


def _train(model: Path, root: Path, output_format: str, targets: list[str]) -> Path:
    from media_factory import make_image
    from test_hidream import hd_config

    data = root / "image"
    data.mkdir(parents=True, exist_ok=True)
    make_image(data / "image.png", width=64, height=64, index=2)
    (data / "image.txt").write_text("a square on a gray ground", encoding="utf-8")
    config = hd_config(model, data, root, output_format=output_format, max_steps=3, learning_rate=0.01,
                       output_path=str(root / "out" / f"{output_format.lower()}.safetensors"),
                       # alpha / rank = 2: a power of two, so COMFY's lora_B times it is exact in bf16 too.
                       lora={"rank": 4, "alpha": 8.0, "target_layers": targets})
    (path,) = Trainer(config).run().output_paths
    return path


# Both streams' attention of a dual-stream block, a routed and the shared expert, a single-stream
# block's projection and modulation, a caption projection and the final layer.
TARGETS = ["double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_out_t",
           "double_stream_blocks.0.block.ff_i.experts.0.w1", "double_stream_blocks.0.block.ff_i.shared_experts.w2",
           "single_stream_blocks.0.block.attn1.to_v", "single_stream_blocks.0.block.adaLN_modulation.1",
           "caption_projection.1.linear", "final_layer.linear"]


def _transformer_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, 4, 4, generator=gen), "timesteps": torch.tensor([500.0]),
            "encoder_hidden_states_t5": torch.randn(1, 8, 32, generator=gen),
            "encoder_hidden_states_llama3": torch.randn(4, 1, 8, 48, generator=gen),
            "pooled_embeds": torch.randn(1, 40, generator=gen), "return_dict": False}


@pytest.mark.numerics
def test_comfy_and_diffusers_files_of_one_seeded_run_give_the_same_pipeline_output(tiny_hd: Path, tmp_path: Path) -> None:
    from diffusers import HiDreamImagePipeline
    from safetensors.torch import load_file

    diffusers_file = _train(tiny_hd, tmp_path / "d", "DIFFUSERS", TARGETS)
    comfy_file = _train(tiny_hd, tmp_path / "c", "COMFY", TARGETS)
    keys = set(load_file(comfy_file))
    assert keys == {f"diffusion_model.{t}.lora_{p}.weight" for t in TARGETS for p in "AB"}

    outputs, images = {}, {}
    for name, path in (("none", None), ("diffusers", diffusers_file), ("comfy", comfy_file)):
        pipe = HiDreamImagePipeline.from_pretrained(tiny_hd)
        pipe.set_progress_bar_config(disable=True)
        if path is not None:
            pipe.load_lora_weights(str(path))
        loaded = {n for n, m in pipe.transformer.named_modules() if getattr(m, "lora_A", None)}
        assert loaded == (set(TARGETS) if path else set())
        with torch.no_grad():
            outputs[name] = pipe.transformer(**_transformer_inputs())[0]
        pipe.default_sample_size = 4
        images[name] = pipe("a square on a gray ground", num_inference_steps=2, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(0), output_type="pt").images
    # The same bf16 weights (alpha / rank a power of two): the two files differ only in where that
    # scale is applied, exact either way, so the forwards agree up to float32 summation order.
    tolerance = forward_tolerance(pipe.transformer) * float(outputs["diffusers"].abs().max())
    torch.testing.assert_close(outputs["comfy"], outputs["diffusers"], rtol=0, atol=tolerance)
    assert not torch.allclose(outputs["diffusers"], outputs["none"], atol=100 * tolerance)
    # Through two denoising steps and the VAE's decoder (images in [0, 1]): each forward's rounding,
    # relative to outputs of order 1.
    image_tolerance = 2 * forward_tolerance(pipe.transformer) + forward_tolerance(pipe.vae.decoder)
    torch.testing.assert_close(images["comfy"], images["diffusers"], rtol=0, atol=image_tolerance)
    assert float((images["diffusers"] - images["none"]).abs().max()) > 1e-3


def test_the_save_refuses_a_lora_bias(tiny_hd: Path) -> None:
    from diffusers import HiDreamImageTransformer2DModel
    from peft import LoraConfig

    from core.export.lora import build_lora_tensors
    from core.models.hidream import HiDreamAdapter

    model = HiDreamImageTransformer2DModel.from_pretrained(tiny_hd, subfolder="transformer")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["final_layer.linear"], lora_bias=True))
    with pytest.raises(UserError, match=r"COMFY.*final_layer\.linear.*bias.*DIFFUSERS"):
        build_lora_tensors(model, "COMFY", comfy_keys=HiDreamAdapter(tiny_hd).comfy_lora_keys())
