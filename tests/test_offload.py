"""Block offloading (core/memory/offload.py) and activation offloading (activation_offload.py), on a CPU.

The offloader runs its real code path with device "cpu" (copies are clones, no stream): what is
checked is which block is resident when it runs, the bytes moved, and that a LoRA trained with
offloading gets exactly the gradients it gets without.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig

from core.errors import ConfigError
from core.memory.activation_offload import ActivationOffload, activation_offload
from core.memory.offload import (
    BlockOffloader,
    offload_config_problem,
    offloaded_block_count,
    offloaded_block_indices,
)
from core.train.run_info import part_summary

TARGETS = ["attn1.to_q", "attn1.to_v", "attn2.to_k", "ffn.net.2"]
LAYERS = 6


# numerics: results depend on float kernels (docs/testing.md)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def config(tiny_model: Callable[[str], Path]) -> dict:
    folder = tiny_model("wan21")
    # The tiny model's own config with more blocks, so that a ring of 2 slots has work to do.
    return dict(json.loads((folder / "transformer" / "config.json").read_text()), num_layers=LAYERS)


def _model(config: dict, weight_dtype: str | None = None, checkpointing: bool = True) -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(config).requires_grad_(False)
    if weight_dtype:
        from core.memory.quantize import quantize_model

        model = model.to(torch.bfloat16)
        quantize_model(model, weight_dtype)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=True))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


@pytest.fixture(scope="module")
def expected(config: dict) -> tuple[torch.Tensor, dict]:
    """Output and LoRA gradients of one step without any offloading."""
    return _step(_model(config))


def _step(model: WanTransformer3DModel, dtype: torch.dtype = torch.float32, context: object = None) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(2)
    inputs = {"hidden_states": torch.randn(2, 16, 2, 8, 8, generator=g).to(dtype), "timestep": torch.tensor([500.0, 100.0]),
              "encoder_hidden_states": torch.randn(2, 7, 32, generator=g).to(dtype), "return_dict": False}
    if context is None:
        out = model(**inputs)[0]
    else:
        with context:
            out = model(**inputs)[0]
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_which_blocks_are_offloaded() -> None:
    assert offloaded_block_indices(0.0, 30) == []
    assert offloaded_block_indices(1.0, 6) == [0, 1, 2, 3, 4, 5]
    assert offloaded_block_indices(0.5, 6) == [1, 3, 5]  # spread out, not the last half
    assert offloaded_block_count(0.5, 5) == 3 and offloaded_block_count(0.01, 30) == 1  # ceil
    assert len(set(offloaded_block_indices(0.37, 40))) == offloaded_block_count(0.37, 40) == 15
    with pytest.raises(ValueError):
        offloaded_block_count(1.5, 10)


def test_offloading_needs_gradient_checkpointing() -> None:
    problem = offload_config_problem({"layer_offload_fraction": 0.5, "gradient_checkpointing": "OFF"})
    assert isinstance(problem, ConfigError) and problem.key == "gradient_checkpointing"
    assert "layer_offload_fraction" in problem.keys and "gradient_checkpointing ON" in str(problem)
    assert offload_config_problem({"layer_offload_fraction": 0.5, "gradient_checkpointing": "CPU_OFFLOADED"}) is None
    assert offload_config_problem({"layer_offload_fraction": 0.0, "gradient_checkpointing": "OFF"}) is None


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_same_outputs_and_gradients_with_and_without_offloading(config: dict, expected: tuple, fraction: float) -> None:
    expected_out, expected_grads = expected
    model = _model(config)
    offloader = BlockOffloader(model.blocks, fraction, "cpu").attach(model)
    assert offloader.offloaded == offloaded_block_indices(fraction, LAYERS)
    for _ in range(2 if fraction == 1.0 else 1):  # a second step starts with blocks left resident by the first
        out, grads = _step(model)
        assert torch.equal(out, expected_out)
        assert grads.keys() == expected_grads.keys()
        assert all(torch.equal(grads[k], expected_grads[k]) for k in grads)
    assert (offloader.take_bytes_moved() > 0) == (fraction > 0)


@pytest.mark.parametrize("weight_dtype", ["FLOAT_8", "NFLOAT_4"])
def test_quantized_storage_travels_and_trains_the_same(config: dict, weight_dtype: str) -> None:
    expected_out, expected_grads = _step(_model(config, weight_dtype), torch.bfloat16)
    model = _model(config, weight_dtype)
    offloader = BlockOffloader(model.blocks, 1.0, "cpu").attach(model)
    out, grads = _step(model, torch.bfloat16)
    assert torch.equal(out, expected_out) and all(torch.equal(grads[k], expected_grads[k]) for k in expected_grads)
    # What moves is the quantized storage (1 byte or half a byte per weight plus scales, the bytes
    # part_summary measures for the block's frozen tensors), not a dequantized copy.
    fresh = _model(config, weight_dtype)
    lora = sum(p.numel() * p.element_size() for p in fresh.blocks[0].parameters() if p.requires_grad)
    assert offloader.block_bytes(0) == part_summary(fresh.blocks[0])["weight_bytes"] - lora
    assert offloader.block_bytes(0) < part_summary(_model(config).blocks[0])["weight_bytes"] - lora / 2


def test_trace_ring_and_bytes(config: dict) -> None:
    model = _model(config)
    offloader = BlockOffloader(model.blocks, 1.0, "cpu", slots=2, record_trace=True).attach(model)
    block = offloader.block_bytes(0)
    assert all(offloader.block_bytes(i) == block for i in range(LAYERS))
    _step(model)
    runs = [(i, resident) for event, i, resident in offloader.trace if event == "run"]
    # forward 0..5, then the backward recomputes 5..0 (the last block twice in a row at the turn)
    assert [i for i, _ in runs] == [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]
    assert all(i in resident and len(resident) <= 2 for i, resident in runs)
    loads = [(i, why) for event, i, why in offloader.trace if event == "load"]
    # forward loads all 6 (block 0 on demand, the rest prefetched one ahead); the backward reuses
    # 5 and 4, still in the ring, and prefetches 3, 2, 1, 0 one behind.
    assert loads == [(0, "demand"), *[(i, "prefetch") for i in range(1, 6)], *[(i, "prefetch") for i in (3, 2, 1, 0)]]
    assert offloader.take_bytes_moved() == 10 * block
    assert offloader.take_bytes_moved() == 0  # reset by the read
    offloader.trace.clear()
    _step(model)
    assert offloader.take_bytes_moved() == 8 * block  # 0 and 1 were still resident from the last backward
    assert sum(1 for event, *_ in offloader.trace if event == "evict") == 8


def test_frozen_weights_live_on_the_cpu_and_trainable_ones_never_move(config: dict) -> None:
    model = _model(config)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    offloader = BlockOffloader(model.blocks, 0.5, "cpu", record_trace=True).attach(model)
    masters = {id(m): {n: t for n, t in m._parameters.items() if t is not None and not t.requires_grad}
               for m in model.blocks[1].modules()}
    _step(model)
    assert {n: p for n, p in model.named_parameters() if p.requires_grad}.keys() == lora.keys()
    assert all(p is lora[n] for n, p in model.named_parameters() if p.requires_grad)  # same objects: the optimizer's
    # After the step, the blocks no longer in the ring point back at their CPU masters.
    offloader.detach()
    for module in model.blocks[1].modules():
        for name, master in masters[id(module)].items():
            assert module._parameters[name] is master
    assert offloader.resident() == []
    names = offloader.ignored_tensor_names()
    assert names and all(n.startswith(("blocks.1.", "blocks.3.", "blocks.5.")) for n in names)
    assert set(names) <= {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}


def test_one_slot_loads_each_block_when_it_runs(config: dict, expected: tuple) -> None:
    expected_out, expected_grads = expected
    model = _model(config)
    offloader = BlockOffloader(model.blocks, 1.0, "cpu", slots=1, record_trace=True).attach(model)
    out, grads = _step(model)
    assert torch.equal(out, expected_out) and all(torch.equal(grads[k], expected_grads[k]) for k in expected_grads)
    assert all(why == "demand" for event, _, why in offloader.trace if event == "load")
    assert all(len(resident) == 1 for event, _, resident in offloader.trace if event == "run")


def test_activation_offload_keeps_gradients_and_moves_saved_tensors(config: dict, expected: tuple) -> None:
    expected_out, expected_grads = expected
    hooks = ActivationOffload(include_cpu=True)
    out, grads = _step(_model(config), context=hooks)
    assert torch.equal(out, expected_out) and all(torch.equal(grads[k], expected_grads[k]) for k in expected_grads)
    # With checkpointing only the blocks' inputs are saved; the text embeddings and timestep
    # projection every block saves again are copied once.
    assert 0 < hooks.offloaded_tensors < hooks.saved_tensors
    assert hooks.offloaded_bytes > 0
    unchecked = ActivationOffload(include_cpu=True)
    _step(_model(config, checkpointing=False), context=unchecked)
    assert unchecked.offloaded_bytes > 5 * hooks.offloaded_bytes  # what checkpointing saves
    # On a CPU without include_cpu nothing needs moving.
    plain = ActivationOffload()
    _step(_model(config), context=plain)
    assert plain.offloaded_tensors == 0 and plain.saved_tensors == hooks.saved_tensors


def test_activation_offload_for_each_setting() -> None:
    assert isinstance(activation_offload("CPU_OFFLOADED"), ActivationOffload)
    for setting in ("ON", "OFF"):
        assert not isinstance(activation_offload(setting), ActivationOffload)
        with activation_offload(setting):
            pass


def test_offload_with_activation_offload_together(config: dict, expected: tuple) -> None:
    expected_out, expected_grads = expected
    model = _model(config)
    BlockOffloader(model.blocks, 0.5, "cpu").attach(model)
    out, grads = _step(model, context=ActivationOffload(include_cpu=True))
    assert torch.equal(out, expected_out) and all(torch.equal(grads[k], expected_grads[k]) for k in expected_grads)


def test_attach_twice_is_an_error(config: dict, tmp_path: Path) -> None:
    model = _model(config)
    offloader = BlockOffloader(model.blocks, 0.5, "cpu").attach(model)
    with pytest.raises(RuntimeError):
        offloader.attach(model)


def test_copy_timing_is_off_by_default_and_counts_each_copy_when_on() -> None:
    # take_copy_seconds (for the GPU acceptance run's achieved bandwidth): None unless asked for;
    # on a CPU a clock around each copy (on CUDA, events on the copy stream).
    stack = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)]).requires_grad_(False)
    quiet = BlockOffloader(stack, 0.5, "cpu").attach()
    for block in stack:
        block(torch.ones(1, 8))
    assert quiet.take_copy_seconds() is None
    quiet.detach()
    timed = BlockOffloader(stack, 0.5, "cpu", time_copies=True).attach()
    for block in stack:
        block(torch.ones(1, 8))
    assert timed.take_bytes_moved() > 0
    seconds = timed.take_copy_seconds()
    assert seconds is not None and seconds >= 0.0
    assert timed.take_copy_seconds() == 0.0  # taken: nothing since
    timed.detach()
