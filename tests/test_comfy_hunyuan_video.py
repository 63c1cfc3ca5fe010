"""COMFY LoRA files of Hunyuan Video: ComfyUI's original module names, read back by diffusers' own
converter (_convert_hunyuan_video_lora_to_diffusers) into the update that was trained, and through
HunyuanVideoPipeline.load_lora_weights into the output the DIFFUSERS file of the same run gives."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from media_factory import make_clip
from numerics import forward_tolerance

from core.errors import ConfigError, UserError
from core.export.comfy_hunyuan_video import diffusers_to_comfy
from core.models.hunyuan_video import DUAL_LORA_TARGETS
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The converter splits the single-stream linear1 at the released model's hidden size.
RELEASED_HIDDEN, RELEASED_MLP = 3072, 4 * 3072


@pytest.fixture(scope="module")
def tiny_hv(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hunyuan_video")


def _convert_back(comfy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    return {k.removeprefix("transformer."): v for k, v in _convert_hunyuan_video_lora_to_diffusers(dict(comfy)).items()}


def _updates(state: dict[str, torch.Tensor], scales: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Module -> scale * B @ A."""
    modules = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    return {m: (scales or {}).get(m, 1.0) * state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"] for m in modules}


def _synthetic(shapes: dict[str, tuple[int, int]], rank: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    state, scales = {}, {}
    for i, (module, (out, inp)) in enumerate(sorted(shapes.items())):
        state[f"{module}.lora_A.weight"] = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
        state[f"{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen, dtype=torch.float64)
        scales[module] = 0.5 + i % 3
    return state, scales


def _assert_same_updates(state, scales, comfy) -> None:
    ours, theirs = _updates(state, scales), _updates(_convert_back(comfy))
    for module, update in ours.items():
        # float64 products of the same terms plus exact zeros: rounding only.
        torch.testing.assert_close(theirs[module], update, msg=module)
    for module in set(theirs) - set(ours):  # the unused members of a fused layer, the marker: no update
        assert not theirs[module].any(), module


@pytest.mark.numerics
def test_every_linear_of_the_tiny_model_but_the_refused_converts_back_to_its_update(tiny_hv: Path) -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel.from_pretrained(tiny_hv, subfolder="transformer")
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    refused = re.compile(r"(.*refiner_blocks\.\d+\.attn\.to_[qkv]|norm_out\.linear"
                         r"|(context_embedder\.)?time_text_embed\.(timestep|guidance)_embedder\..+"
                         r"|context_embedder\.time_text_embed\.text_embedder\..+"
                         # The converter splits linear1 at 3072 rows: below, at the released size.
                         r"|single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp))")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not refused.fullmatch(n)}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "single_transformer_blocks.0.proj_out",
            "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear", "proj_out"} <= set(shapes)
    state, scales = _synthetic(shapes)
    comfy = diffusers_to_comfy(state, scales, hidden_size=hidden, mlp_width=int(hidden * model.config.mlp_ratio))
    assert all(k.startswith("diffusion_model.") for k in comfy) and not any(k.endswith(".alpha") for k in comfy)
    assert comfy["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"].shape == (9, hidden)  # three rank-3 members
    assert comfy["diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight"].shape == (3 * hidden, 9)
    _assert_same_updates(state, scales, comfy)


@pytest.mark.numerics
def test_the_single_stream_linear1_fuses_q_k_v_and_the_mlp_at_the_released_size() -> None:
    block = "single_transformer_blocks.3."
    shapes = {block + "attn.to_q": (RELEASED_HIDDEN, RELEASED_HIDDEN), block + "attn.to_v": (RELEASED_HIDDEN, RELEASED_HIDDEN),
              block + "proj_mlp": (RELEASED_MLP, RELEASED_HIDDEN)}
    state, scales = _synthetic(shapes, rank=2)
    comfy = diffusers_to_comfy(state, scales, hidden_size=RELEASED_HIDDEN, mlp_width=RELEASED_MLP)
    assert comfy["diffusion_model.single_blocks.3.linear1.lora_B.weight"].shape == (3 * RELEASED_HIDDEN + RELEASED_MLP, 6)
    # No dual-stream LoRA: the zero marker is what makes diffusers read the file as this format.
    assert not comfy["diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight"].any()
    _assert_same_updates(state, scales, comfy)


@pytest.mark.parametrize("module", ["norm_out.linear", "context_embedder.token_refiner.refiner_blocks.0.attn.to_q",
                                    "x_embedder.proj", "transformer_blocks.0.norm1.norm",
                                    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
                                    "context_embedder.time_text_embed.text_embedder.linear_1"])
def test_a_layer_without_a_readable_comfy_name_is_refused(module: str) -> None:
    state, scales = _synthetic({module: (4, 4)})
    with pytest.raises(ValueError, match=re.escape(module)):
        diffusers_to_comfy(state, scales, hidden_size=4, mlp_width=8)


# ComfyUI's own module names of the tiny layout's Linears (comfy/ldm/hunyuan_video/model.py on Flux's
# DoubleStreamBlock, SingleStreamBlock, MLPEmbedder and LastLayer), and the renames its LoRA key map
# applies to them (comfy/lora.py, model_lora_keys_unet, HunyuanVideo: "diffusion-pipe lora format").
COMFY_MODEL_LINEARS = (
    [f"double_blocks.0.{s}_{m}" for s in ("img", "txt") for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    + [f"single_blocks.0.{m}" for m in ("linear1", "linear2", "modulation.lin")]
    + [f"{e}.{m}" for e in ("time_in", "vector_in", "guidance_in", "txt_in.t_embedder", "txt_in.c_embedder")
       for m in ("in_layer", "out_layer")]
    + ["txt_in.input_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    + [f"txt_in.individual_token_refiner.blocks.0.{m}" for m in ("self_attn.qkv", "self_attn.proj", "mlp.0", "mlp.2",
                                                                  "adaLN_modulation.1")])
COMFY_LORA_RENAMES = [("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                      ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear.")]


def _comfy_lora_names() -> set[str]:
    names = set()
    for module in COMFY_MODEL_LINEARS:
        key = f"diffusion_model.{module}.weight"
        for old, new in COMFY_LORA_RENAMES:
            key = key.replace(old, new)
        names.add(key.removesuffix(".weight"))
    return names


def test_every_name_written_is_one_comfyuis_lora_key_map_reads(tiny_hv: Path) -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    from core.export.comfy_hunyuan_video import hunyuan_module_name

    model = HunyuanVideoTransformer3DModel.from_pretrained(tiny_hv, subfolder="transformer")
    readable = _comfy_lora_names()
    written = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            try:
                written.add("diffusion_model." + hunyuan_module_name(name)[0])
            except ValueError:
                continue
    assert written and written <= readable, written - readable
    assert "diffusion_model.double_blocks.0.img_attn_qkv" in written and "diffusion_model.single_blocks.0.linear1" in written


def _train(model: Path, root: Path, output_format: str, targets: list[str]) -> Path:
    from test_hunyuan_video import hv_config

    data = root / "clip"
    data.mkdir(parents=True, exist_ok=True)
    make_clip(data / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (data / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    suffix = output_format.lower()
    config = hv_config(model, data, root, output_format=output_format, max_steps=3, learning_rate=0.01,
                       output_path=str(root / "out" / f"{suffix}.safetensors"),
                       # alpha / rank = 2: a power of two, so COMFY's lora_B times it is exact in bf16 too.
                       lora={"rank": 4, "alpha": 8.0, "target_layers": targets})
    (path,) = Trainer(config).run().output_paths
    return path


# Dual-stream attention (fused qkv of both streams), a block MLP, a single-stream output and
# modulation, the final projection, the text input embedder and the token refiner's MLP: every kind of
# name the tiny model can round-trip.
TARGETS = ([f"transformer_blocks.0.{t}" for t in DUAL_LORA_TARGETS]
           + ["transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.0.proj_out",
              "single_transformer_blocks.0.norm.linear", "context_embedder.proj_in", "proj_out",
              "context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj"])


@pytest.mark.numerics
def test_comfy_and_diffusers_files_of_one_seeded_run_give_the_same_pipeline_output(tiny_hv: Path, tmp_path: Path) -> None:
    from diffusers import HunyuanVideoPipeline
    from safetensors.torch import load_file

    diffusers_file = _train(tiny_hv, tmp_path / "d", "DIFFUSERS", TARGETS)
    comfy_file = _train(tiny_hv, tmp_path / "c", "COMFY", TARGETS)
    keys = set(load_file(comfy_file))
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight" in keys
    assert "diffusion_model.single_blocks.0.linear2.lora_B.weight" in keys and all(k.startswith("diffusion_model.") for k in keys)

    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=gen), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=gen), encoder_attention_mask=torch.ones(1, 6),
                  pooled_projections=torch.randn(1, 32, generator=gen), guidance=torch.tensor([1000.0]), return_dict=False)
    outputs = {}
    for name, path in (("none", None), ("diffusers", diffusers_file), ("comfy", comfy_file)):
        pipe = HunyuanVideoPipeline.from_pretrained(tiny_hv)
        if path is not None:
            pipe.load_lora_weights(str(path))
        with torch.no_grad():
            outputs[name] = pipe.transformer(**inputs)[0]
    # The same bf16 weights; the fused layers only add exact zeros, in matmuls of other shapes
    # (another summation order: tests/numerics.py).
    tolerance = forward_tolerance(pipe.transformer) * float(outputs["diffusers"].abs().max())
    torch.testing.assert_close(outputs["comfy"], outputs["diffusers"], rtol=0, atol=tolerance)
    assert not torch.allclose(outputs["diffusers"], outputs["none"], atol=100 * tolerance)


def test_a_layer_comfy_cannot_name_is_refused_before_training(tiny_hv: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"COMFY.*norm_out\.linear.*DIFFUSERS") as caught:
        _train(tiny_hv, tmp_path, "COMFY", ["transformer_blocks.0.attn.to_q", "norm_out.linear"])
    assert caught.value.key == "lora.target_layers"
    assert not (tmp_path / "workspace" / "metrics.jsonl").exists()  # no step ran


def test_the_save_refuses_such_a_layer_too(tiny_hv: Path) -> None:
    from diffusers import HunyuanVideoTransformer3DModel
    from peft import LoraConfig

    from core.export.lora import build_lora_tensors
    from core.models.hunyuan_video import HunyuanVideoAdapter

    model = HunyuanVideoTransformer3DModel.from_pretrained(tiny_hv, subfolder="transformer")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["x_embedder.proj", "transformer_blocks.0.attn.to_q"]))
    with pytest.raises(UserError, match=r"COMFY.*x_embedder\.proj.*DIFFUSERS"):
        build_lora_tensors(model, "COMFY", comfy_keys=HunyuanVideoAdapter(tiny_hv).comfy_lora_keys())
