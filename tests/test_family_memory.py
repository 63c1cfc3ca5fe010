"""What the model family says about memory and frames: which Linear layers are quantized
(ModelAdapter.quantize_filter), which block stacks are streamed (block_stacks) and which frame
counts the denoiser accepts (frame_rule), shown on a second architecture beside Wan.

The quantization tests use the tiny CogVideoX transformer (diffusers' CogVideoXTransformer3DModel,
blocks under `transformer_blocks`); the offloading tests a small module with two stacks, the shape
of Hunyuan Video's and HiDream's dual- then single-stream blocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("optimum.quanto")
pytest.importorskip("bitsandbytes")

from media_factory import make_clip, make_image

from core.config import resolve
from core.data.cache import ContentHasher
from core.data.frames import NoAcceptedFrameCount, plan_frames, sample_length
from core.data.media import MediaInfo
from core.data.plan import plan_data
from core.errors import ConfigError, UserError
from core.memory.offload import offloaded_block_indices
from core.memory.quantize import LayerFilter, quantize_model, quantized_layer_names, select_layers
from core.memory.quantize_cache import load_quantized_part, quantized_cache_path
from core.models.frame_rule import FrameRule
from core.models.tiny import build_tiny_model
from core.models.wan import WanAdapter
from core.train.placement import place_denoiser
from core.train.run_info import part_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COG_BLOCKS = LayerFilter("cogvideox", "transformer", r"transformer_blocks\.\d+\..+")
FORMATS = {"FLOAT_8": "qfloat8_e4m3fn", "NFLOAT_4": "nf4"}


@pytest.fixture(scope="module")
def cogvideox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("cogvideox", tmp_path_factory.mktemp("models") / "cogvideox")


def _cog_transformer(folder: Path):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16).requires_grad_(False)


def _block_linears(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.")}


class WrongLayoutAdapter(WanAdapter):
    """Wan's adapter (its filter names `blocks.N`) pointed at a folder whose transformer is CogVideoX's:
    what a family whose filter does not fit the model it loads looks like to the quantized load."""


class CogLayoutAdapter(WanAdapter):
    """The same, with the memory answers a CogVideoX adapter gives: its filter and its one stack."""

    def quantize_filter(self, part: str, weight_dtype: str) -> LayerFilter:
        return COG_BLOCKS

    def block_stacks(self, transformer) -> list:
        return [transformer.transformer_blocks]


# ------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("weight_dtype", sorted(FORMATS))
def test_the_familys_filter_quantizes_every_block_linear_of_cogvideox(cogvideox: Path, weight_dtype: str) -> None:
    model = _cog_transformer(cogvideox)
    every = _block_linears(model)
    assert len(every) == 2 * 8  # 2 blocks: attn1 q/k/v/out, norm1/norm2 linears, the feed-forward pair
    report = quantize_model(model, weight_dtype, include=COG_BLOCKS)
    assert set(report.quantized) == every == set(quantized_layer_names(model))
    assert set(part_summary(model)["quantized_bytes_by_format"]) == {FORMATS[weight_dtype]}
    assert type(model.proj_out) is torch.nn.Linear  # outside the blocks: left in bfloat16
    # Without a filter, the default (Linear layers in the top-level ModuleLists) finds the same ones.
    assert set(select_layers(_cog_transformer(cogvideox))) == every


def test_a_filter_matching_no_layer_is_an_error_naming_family_part_and_dtype(cogvideox: Path, tmp_path: Path) -> None:
    wan_filter = WrongLayoutAdapter(cogvideox, family="wan21").quantize_filter("transformer", "NFLOAT_4")
    with pytest.raises(ConfigError, match=r"transformer\.weight_dtype NFLOAT_4.*wan21.*transformer.*bug to report") as caught:
        quantize_model(_cog_transformer(cogvideox), "NFLOAT_4", include=wan_filter)
    assert caught.value.key == "transformer.weight_dtype"
    # Through the adapter's quantized load: refused before anything is loaded or cached.
    with pytest.raises(ConfigError, match="wan21 adapter's layer filter"):
        WrongLayoutAdapter(cogvideox, family="wan21").load_quantized_transformer("transformer", "FLOAT_8", cache_dir=tmp_path)
    assert not (tmp_path / "quantized").exists()


def test_the_quantized_load_takes_the_adapters_filter_and_the_cache_key_follows_it(cogvideox: Path, tmp_path: Path) -> None:
    adapter = CogLayoutAdapter(cogvideox, family="wan21")
    model = adapter.load_quantized_transformer("transformer", "FLOAT_8", cache_dir=tmp_path)
    assert set(quantized_layer_names(model)) == _block_linears(_cog_transformer(cogvideox))
    attention_only = LayerFilter("cogvideox", "transformer", r"transformer_blocks\.\d+\.attn1\..+")
    narrow, report = load_quantized_part(cogvideox, "transformer", "FLOAT_8", cache_dir=tmp_path, include=attention_only)
    assert not report.from_cache and set(report.quantized) < set(quantized_layer_names(model))
    assert len(list((tmp_path / "quantized").glob("*.safetensors"))) == 2
    again, report = load_quantized_part(cogvideox, "transformer", "FLOAT_8", cache_dir=tmp_path, include=COG_BLOCKS)
    assert report.from_cache and set(quantized_layer_names(again)) == set(quantized_layer_names(model))
    # The same layers chosen by another filter is another file: a changed filter never reuses one.
    names = sorted(report.quantized)
    component = cogvideox / "transformer"
    other = LayerFilter("cogvideox", "transformer", r"transformer_blocks\.\d+\..+", exclude=r".+\.nothing")
    assert (quantized_cache_path(tmp_path, component, "FLOAT_8", names, COG_BLOCKS.identity)
            != quantized_cache_path(tmp_path, component, "FLOAT_8", names, other.identity))


def test_wans_filters_are_its_own(tmp_path: Path) -> None:
    folder = build_tiny_model("wan21", tmp_path / "wan21")
    adapter = WanAdapter(folder)
    assert adapter.quantize_filter("transformer", "FLOAT_8")("blocks.0.attn1.to_q", torch.nn.Linear(2, 2))
    assert not adapter.quantize_filter("transformer", "FLOAT_8")("proj_out", torch.nn.Linear(2, 2))
    text = adapter.quantize_filter("text_encoder", "NFLOAT_4")
    assert text("encoder.block.0.layer.1.DenseReluDense.wi_0", torch.nn.Linear(2, 2))
    assert not text("encoder.block.0.layer.1.DenseReluDense.wo", torch.nn.Linear(2, 2))
    assert adapter.quantize_filter("text_encoder", "FLOAT_8")("encoder.block.0.layer.1.DenseReluDense.wo", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no quantizable part"):
        adapter.quantize_filter("transformer_2", "FLOAT_8")


# ------------------------------------------------------------------------------ two block stacks


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width))
        self.lora = torch.nn.Linear(width, width, bias=False)  # the trained part: stays on the device

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.proj(h) * self.scale) + self.lora(h)


class TwoStacks(torch.nn.Module):
    """Dual- then single-stream stacks, each block checkpointed as diffusers does."""

    def __init__(self, width: int = 8, dual: int = 3, single: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(width, width)
        self.transformer_blocks = torch.nn.ModuleList(_Block(width) for _ in range(dual))
        self.single_transformer_blocks = torch.nn.ModuleList(_Block(width) for _ in range(single))
        self.out = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = self.embed(x)
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            h = checkpoint(block, h, use_reentrant=False)
        return self.out(h)


class _StacksAdapter:
    """What placement asks of an adapter for offloading."""

    def block_stacks(self, model: TwoStacks) -> list:
        return [model.transformer_blocks, model.single_transformer_blocks]


def _two_stacks() -> TwoStacks:
    torch.manual_seed(0)
    model = TwoStacks().requires_grad_(False)
    for name, p in model.named_parameters():
        if ".lora." in name:
            p.requires_grad_(True)
    return model


def _step(model: TwoStacks) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    out = model(x)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_offloading_streams_every_stack_and_trains_the_same() -> None:
    expected_out, expected_grads = _step(_two_stacks())
    model = _two_stacks()
    offloader = place_denoiser(model, _StacksAdapter(), {"layer_offload_fraction": 0.5}, torch.device("cpu"))
    offloader.record_trace = True
    # 0.5 of the 6 blocks of both stacks, spread over them in forward order: one in the first stack, two in the second.
    assert offloader.offloaded == offloaded_block_indices(0.5, 6) == [1, 3, 5]
    for _ in range(2):  # the second step starts with blocks left resident by the first
        out, grads = _step(model)
        assert torch.equal(out, expected_out)
        assert grads.keys() == expected_grads.keys() and len(grads) == 6
        assert all(torch.equal(grads[k], expected_grads[k]) for k in grads)
        model.zero_grad(set_to_none=True)
    runs = [(index, resident) for event, index, resident in offloader.trace if event == "run"]
    assert sorted({index for index, _ in runs}) == [1, 3, 5]
    assert all(index in resident for index, resident in runs)  # resident whenever it runs
    assert len(runs) == 2 * 2 * 3  # forward and recomputation, two steps, three offloaded blocks
    names = set(offloader.ignored_tensor_names())
    assert "transformer_blocks.1.proj.weight" in names and "single_transformer_blocks.2.scale" in names
    assert names <= {n for n, _ in [*model.named_parameters(), *model.named_buffers()]}
    assert not any(".lora." in n for n in names)


# ------------------------------------------------------------------------------ frame counts

# A rule with a shortest clip and no still images: latent frames a multiple of 2 (8k + 5 pixel frames).
EVEN_LATENTS = FrameRule.latent_multiple(4, 2)


def test_the_default_rule_is_wans_4k_plus_1() -> None:
    wan = FrameRule.latent_multiple(4)
    assert all(wan.round_down(n) == sample_length(n, 1000, 4) for n in range(1, 200))
    assert wan.describe() == "1, 5, 9, 13, ... (4k + 1)"


def test_a_temporal_patch_of_2_accepts_even_latent_frame_counts() -> None:
    accepted = [n for n in range(1, 60) if EVEN_LATENTS.accepts(n)]
    assert accepted == [5, 13, 21, 29, 37, 45, 53]
    assert all(((n - 1) // 4 + 1) % 2 == 0 for n in accepted)
    assert [EVEN_LATENTS.round_down(n) for n in (4, 5, 12, 13, 49, 81)] == [None, 5, 5, 13, 45, 77]
    assert EVEN_LATENTS.round_down(1) is None and not EVEN_LATENTS.accepts(1)
    assert "8k + 5" in EVEN_LATENTS.describe()


def test_frame_plans_round_down_or_refuse() -> None:
    info = MediaInfo(Path("clip.mp4"), "video", 64, 64, 0, 16.0, 3.0, 48, "h264", False, 1000, 1)
    vc = {"max_frames": 64, "target_fps": 16.0, "frame_sample_strategy": "uniform"}
    assert len(plan_frames(info, frames=33, video_config=vc, frame_rule=EVEN_LATENTS).times) == 29
    assert len(plan_frames(info, frames=33, video_config=vc).times) == 33  # no rule: 4k + 1 as before
    short = MediaInfo(Path("short.mp4"), "video", 64, 64, 0, 16.0, 0.25, 4, "h264", False, 1000, 1)  # 4 frames to pick from
    with pytest.raises(NoAcceptedFrameCount, match=r"4 frames to pick from.*8k \+ 5"):
        plan_frames(short, frames=33, video_config=vc, frame_rule=EVEN_LATENTS)


class _EvenLatentFrames(WanAdapter):
    @property
    def frame_rule(self) -> FrameRule:
        return EVEN_LATENTS


def test_the_data_plan_rounds_to_the_adapters_rule_and_names_what_it_leaves_out(tmp_path: Path) -> None:
    model = build_tiny_model("wan21", tmp_path / "wan21")
    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(clips / "long.mp4", width=64, height=64, fps=16, seconds=1.5)
    make_clip(clips / "short.mp4", width=64, height=64, fps=16, seconds=0.25)
    make_image(clips / "still.png", width=64, height=64)
    for stem in ("long", "short", "still"):
        (clips / f"{stem}.txt").write_text(f"a {stem} one", encoding="utf-8")
    settings = {"base_model": str(model), "datasets": [{"path": str(clips), "repeats": 1}], "cache_dir": str(tmp_path / "cache"),
                "resolution": 64, "frames": 17, "video_config": {"max_frames": 17, "target_fps": 16.0}}
    config = resolve(settings)
    plan = plan_data(config, _EvenLatentFrames(model), ContentHasher(config["cache_dir"]))
    assert [(s.item.path.name, len(s.plans[0].times)) for s in plan.train] == [("long.mp4", 13)]
    reasons = {issue.path.name: issue.reason for issue in plan.issues}
    assert "too short for wan21" in reasons["short.mp4"] and "8k + 5" in reasons["short.mp4"]
    assert "still image" in reasons["still.png"]
    # Wan's own rule keeps all three, with 4k + 1 frames.
    wan_plan = plan_data(config, WanAdapter(model), ContentHasher(config["cache_dir"]))
    assert sorted((s.item.path.name, len(s.plans[0].times)) for s in wan_plan.train) == [
        ("long.mp4", 17), ("short.mp4", 1), ("still.png", 1)]
    with pytest.raises(ConfigError, match=r"frames 3: wan21 accepts 5, 13, 21, 29, \.\.\. \(8k \+ 5\)") as caught:
        plan_data(resolve({**settings, "frames": 3}), _EvenLatentFrames(model), ContentHasher(config["cache_dir"]))
    assert caught.value.key == "frames"
    with pytest.raises(UserError, match="strict_data: 2 file"):
        plan_data(resolve({**settings, "strict_data": True}), _EvenLatentFrames(model), ContentHasher(config["cache_dir"]))

