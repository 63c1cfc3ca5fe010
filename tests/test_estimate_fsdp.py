"""The VRAM estimate for FSDP (core/memory/estimate.py, _shard): what FSDP shards (parameters,
gradients, optimizer state) is divided by distributed.processes, what it gathers (blocks) and what
each process computes (activations) is not; `main.py estimate` says what it assumes. And the engine
refuses a run launched with another number of processes than distributed.processes."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_main

from core.config import load_preset_overlay, resolve
from core.memory.estimate import GIB, estimate_memory
from core.memory.known_models import model_configs
from core.memory.model_sizes import transformer_sizes

A14B = "#wan 2.2 A14B Finetune FSDP 8 GPUs"


def _a14b(**changes: object) -> dict:
    return resolve(load_preset_overlay(A14B), changes, source=A14B)


def _with(config: dict, **distributed: object) -> dict:
    return {**config, "distributed": {**config["distributed"], **distributed}}


def test_fsdp_divides_what_it_shards_and_not_the_activations() -> None:
    base = _a14b(train_dtype="FLOAT_32", transformer={"train": True, "weight_dtype": "FLOAT_32"})
    ddp = estimate_memory(_with(base, strategy="DDP"))
    fsdp = estimate_memory(base)
    assert ddp.details.get("distributed") is None and fsdp.details["distributed"]["processes"] == 8
    # float32 compute: no master-weight upcast, so exactly an eighth of the weights, gradients, state.
    assert fsdp.parts["trainable_state"] == ddp.parts["trainable_state"] // 8
    assert fsdp.parts["activations"] == ddp.parts["activations"]
    # FULL_SHARD gathers two blocks (and the parts outside the blocks) whole, in the compute dtype.
    t = transformer_sizes(model_configs(base["base_model"]).transformers[0])
    block = t.block_stacks()[0].block_parameters() * 4
    outside = (t.parameters() - t.n_blocks * t.block_stacks()[0].block_parameters()) * 4
    assert fsdp.parts["weights"] == 2 * block + outside
    # The same run on one process: nothing to divide.
    assert estimate_memory(_with(base, processes=1)).parts == ddp.parts


def test_bfloat16_fsdp_counts_float32_master_weights() -> None:
    ddp = estimate_memory(_with(_a14b(), strategy="DDP"))  # bfloat16 weights trained in place
    fsdp = estimate_memory(_a14b())
    # accelerate's FSDP upcasts what trains to float32: 4 + 4 + 8 bytes a weight, not 2 + 2 + 4, over 8.
    assert fsdp.parts["trainable_state"] == 2 * ddp.parts["trainable_state"] // 8
    assert "float32 master weights" in fsdp.details["distributed"]["assumes"]


def test_shard_grad_op_keeps_every_block_whole() -> None:
    lora = _a14b(training_method="LORA", output_path="/tmp/x.safetensors")
    ddp = estimate_memory(_with(lora, strategy="DDP"))
    full = estimate_memory(lora)
    grad_op = estimate_memory(_with(lora, sharding="SHARD_GRAD_OP"))
    assert grad_op.parts["weights"] == ddp.parts["weights"]  # all gathered at the backward's start
    assert full.parts["weights"] < ddp.parts["weights"] / 4  # an eighth, and two blocks
    assert grad_op.parts["trainable_state"] == full.parts["trainable_state"] == ddp.parts["trainable_state"] // 8


def test_the_a14b_fsdp_preset_fits_80_gib_per_gpu_at_8_processes() -> None:
    done = run_main("estimate", "--preset", A14B, "--set", "distributed.strategy=FSDP", "--set", "distributed.processes=8",
                    "--vram", "80", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "fits in 80.0 GiB" in done.stdout, done.stdout
    assert "per process of 8 (FSDP FULL_SHARD): parameters, gradients and optimizer state divided by 8" in done.stdout
    assert "activations per process, not divided" in done.stdout
    as_json = json.loads(run_main("estimate", "--preset", A14B, "--json", env={"HF_HUB_OFFLINE": "1"}).stdout)
    assert as_json["needed_bytes"] < 80 * GIB
    # Without sharding the same run needs far more than one 80 GB GPU: what the preset is for.
    ddp = run_main("estimate", "--preset", A14B, "--set", "distributed.strategy=DDP", "--vram", "80", env={"HF_HUB_OFFLINE": "1"})
    assert "does not fit in 80.0 GiB" in ddp.stdout, ddp.stdout


def test_a_run_launched_with_another_process_count_is_refused(tmp_path: Path, user_home: Path) -> None:
    done = run_main("train", "--preset", "#demo tiny wan LoRA", "--set", "distributed.processes=2",
                    "--set", f"workspace_dir={tmp_path / 'ws'}", "--set", f"cache_dir={tmp_path / 'cache'}",
                    "--set", f"output_path={tmp_path / 'out.safetensors'}", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "distributed.processes is 2 but 1 process(es) were launched" in done.stderr


def test_hybrid_shard_divides_by_one_machines_processes() -> None:
    full = estimate_memory(_a14b())
    hybrid = estimate_memory(_with(_a14b(), sharding="HYBRID_SHARD", machines=2))  # 2 machines of 4
    four = estimate_memory(_with(_a14b(), processes=4))  # FULL_SHARD over 4
    assert hybrid.parts == four.parts and hybrid.parts["trainable_state"] == 2 * full.parts["trainable_state"]
    assert "divided by 4 processes (of a machine)" in hybrid.details["distributed"]["assumes"]


def test_a_hybrid_run_on_another_machine_count_is_refused(tmp_path: Path, user_home: Path) -> None:
    done = run_main("train", "--preset", "#demo tiny wan LoRA", "--set", "distributed.strategy=FSDP",
                    "--set", "distributed.sharding=HYBRID_SHARD", "--set", "distributed.machines=2", "--set", "sampling.prompts=[]",
                    "--set", f"workspace_dir={tmp_path / 'ws'}", "--set", f"cache_dir={tmp_path / 'cache'}",
                    "--set", f"output_path={tmp_path / 'out.safetensors'}", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "distributed.machines is 2 but this run was launched on 1 machine(s)" in done.stderr
