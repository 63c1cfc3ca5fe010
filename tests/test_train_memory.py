"""The engine with the memory settings (docs/memory.md): quantized weights, layer offloading, activation
offloading, the estimate beside the run and the out-of-memory advice, in real training runs of the
tiny Wan models on a CPU. The building blocks have their own tests (test_quantize.py, test_offload.py,
test_estimate.py); these check that a run uses them. Harness: engine_runs.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_runs import Outcome, Runs, _trained, lora_equal

pytest.importorskip("optimum.quanto")
pytest.importorskip("bitsandbytes")

import core.memory.estimate as estimate_module
import core.memory.quantize_cache as quantize_cache
from core.config import load_preset, resolve
from core.errors import ConfigError, UserError
from core.memory.known_models import KNOWN_MODELS, configs_from_folder
from core.memory.model_sizes import wan_transformer_sizes
from core.models.tiny import build_tiny_model
from core.models.wan import WanAdapter
from core.train.placement import out_of_memory_error
from core.train.trainer import Trainer

GIB = 2**30
FORMATS = {"FLOAT_32": None, "BFLOAT_16": None, "FLOAT_8": "qfloat8_e4m3fn", "INT_8": "qint8", "INT_4": "qint4", "NFLOAT_4": "nf4"}


def _transformer_variant(source: Path, dest: Path, dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """A copy of a tiny model whose transformer has another shape (the same VAE and text encoder)."""
    from diffusers import WanTransformer3DModel

    shutil.copytree(source, dest)
    config = json.loads((source / "transformer" / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config({**config, **overrides})
    shutil.rmtree(dest / "transformer")
    model.to(dtype).save_pretrained(dest / "transformer")
    return dest


@pytest.fixture(scope="module")
def six_blocks(runs: Runs) -> Path:
    # Two blocks fit the offloader's ring of two slots after the first step; six make it stream.
    return _transformer_variant(runs.model, runs.root / "models" / "six-blocks", num_layers=6)


def _frozen_bytes(outcome: Outcome) -> int:
    """The transformer's frozen weights in bytes, from run_info.json: all its weights less the LoRA's,
    which trains in float32 (4 bytes per trainable parameter)."""
    part = outcome.run_info["parts"]["transformer"]
    return part["weight_bytes"] - 4 * part["trainable_parameters"]


# --------------------------------------------------------------------------------------------------
# Quantized weights


@pytest.mark.parametrize("weight_dtype", sorted(FORMATS))
def test_each_weight_dtype_trains_a_lora_independent_of_it(runs: Runs, weight_dtype: str) -> None:
    outcome = runs.run({"transformer.weight_dtype": weight_dtype, "max_steps": 2})
    _trained(outcome, 2)
    part = outcome.run_info["parts"]["transformer"]
    fmt = FORMATS[weight_dtype]
    assert set(part["quantized_bytes_by_format"]) == ({fmt} if fmt else set())
    if weight_dtype != "INT_8":  # INT_8 leaves the tiny model's 24-wide layers as they are (test_quantize.py)
        config = json.loads((runs.model / "transformer" / "config.json").read_text(encoding="utf-8"))
        expected = wan_transformer_sizes(config).total_bytes(weight_dtype)
        if weight_dtype == "BFLOAT_16":  # the loader casts the modules diffusers keeps in float32 too
            assert _frozen_bytes(outcome) <= expected
        else:
            assert _frozen_bytes(outcome) == expected
    # The LoRA is the same kind of file whatever the base's storage: float names, shapes and dtypes.
    plain = runs.run({"transformer.weight_dtype": "FLOAT_32", "max_steps": 2})
    assert {k: (v.shape, v.dtype) for k, v in outcome.lora.items()} == {k: (v.shape, v.dtype) for k, v in plain.lora.items()}
    assert any(v.abs().max() > 0 for k, v in outcome.lora.items() if "lora_B" in k), "the LoRA did not train"


def test_the_lora_of_a_float8_run_loads_into_an_unquantized_pipeline(runs: Runs) -> None:
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    from core.memory.quantize import quantized_layer_names

    outcome = runs.run({"transformer.weight_dtype": "FLOAT_8", "max_steps": 2})
    _trained(outcome, 2)
    pipe = WanPipeline.from_pretrained(runs.model, dtype=torch.float32)
    assert not quantized_layer_names(pipe.transformer)
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 512, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.transformer(x, torch.tensor([500.0]), text, return_dict=False)[0]
        pipe.load_lora_weights(str(outcome.output), adapter_name="trained")
        after = pipe.transformer(x, torch.tensor([500.0]), text, return_dict=False)[0]
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    saved = {k.removeprefix("transformer."): v for k, v in outcome.lora.items()}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k].to(v.dtype), v) for k, v in saved.items())
    assert not torch.allclose(before, after, atol=1e-6), "the trained LoRA changes the unquantized model"


def test_the_second_quantized_run_reads_the_cache(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    first = runs.run({"transformer.weight_dtype": "INT_4", "max_steps": 2})
    _trained(first, 2)
    (cached,) = (runs.cache / "quantized").glob("transformer-int_4-*.safetensors")
    written = cached.stat().st_mtime_ns
    quantized = []
    monkeypatch.setattr(quantize_cache, "quantize_model", lambda *a, **k: quantized.append(a) or pytest.fail("quantized again"))
    again = runs.run({"transformer.weight_dtype": "INT_4", "max_steps": 2}, fresh=True)
    _trained(again, 2)
    assert not quantized and cached.stat().st_mtime_ns == written
    assert again.losses == first.losses and lora_equal(first, again)


def test_a_single_file_checkpoint_is_quantized_without_the_cache(runs: Runs) -> None:
    # The other model's transformer weights (diffusers' key names) as a checkpoint over this model's folder.
    checkpoint = next((runs.other_model / "transformer").glob("*.safetensors"))
    plain = runs.run({"transformer.weight_dtype": "FLOAT_8", "max_steps": 2})
    from_folder = runs.run({"base_model": str(runs.other_model), "transformer.weight_dtype": "FLOAT_8", "max_steps": 2})
    files = set((runs.cache / "quantized").glob("*"))
    from_file = runs.run({"transformer.weight_dtype": "FLOAT_8", "max_steps": 2, "transformer.model_path": str(checkpoint)})
    _trained(from_file, 2)
    assert set((runs.cache / "quantized").glob("*")) == files, "a checkpoint's quantized weights must not be cached"
    # The checkpoint's weights, not the folder's. diffusers' single-file loader casts every module to
    # bfloat16 where from_pretrained keeps a few in float32 (norms, time embedder): that rounding only.
    assert from_file.losses == pytest.approx(from_folder.losses, rel=1e-3)
    assert from_file.losses != pytest.approx(plain.losses, rel=1e-2)


def test_quantized_weights_shrink_as_promised_in_run_info(runs: Runs) -> None:
    # The tiny model's 24-wide rows make scales, biases and code tables dominate (docs/memory.md);
    # this one is wide enough (192, feed-forward 2304, 16 blocks) for the storage formats to show.
    wide = _transformer_variant(runs.model, runs.root / "models" / "wide", torch.bfloat16, num_attention_heads=4,
                                attention_head_dim=48, ffn_dim=2304, num_layers=16, freq_dim=64)
    sizes = {}
    for weight_dtype in ("BFLOAT_16", "FLOAT_8", "NFLOAT_4"):
        outcome = runs.run({"base_model": str(wide), "transformer.weight_dtype": weight_dtype, "max_steps": 1,
                            "lora.target_layers": ["attn1.to_q"]})
        _trained(outcome, 1)
        sizes[weight_dtype] = _frozen_bytes(outcome)
    ratios = {k: sizes[k] / sizes["BFLOAT_16"] for k in ("FLOAT_8", "NFLOAT_4")}
    assert ratios["FLOAT_8"] <= 0.55 and ratios["NFLOAT_4"] <= 0.30, ratios


# --------------------------------------------------------------------------------------------------
# Layer offloading and activation offloading


@pytest.mark.parametrize(("fraction", "offloaded"), [(0.0, 0), (0.5, 3), (1.0, 6)])
def test_offloading_trains_the_same_lora_and_reports_the_bytes_it_moved(runs: Runs, six_blocks: Path, fraction: float,
                                                                         offloaded: int) -> None:
    changes = {"base_model": str(six_blocks), "gradient_checkpointing": "ON"}
    outcome = runs.run({**changes, "layer_offload_fraction": fraction})
    _trained(outcome, 3)
    assert lora_equal(runs.run({**changes, "layer_offload_fraction": 0.0}), outcome)
    # With k blocks offloaded and two slots, the first step loads 2k - 2 blocks and each later one
    # 2k - 4: the blocks where the pass turns are still resident (core/memory/offload.py).
    config = json.loads((six_blocks / "transformer" / "config.json").read_text(encoding="utf-8"))
    block = wan_transformer_sizes(config).block_bytes("FLOAT_32")
    k = offloaded
    expected = [0, 0, 0] if k == 0 else [(2 * k - 2) * block, (2 * k - 4) * block, (2 * k - 4) * block]
    assert outcome.offload_bytes == expected


def test_cpu_offloaded_activations_move_and_train_the_same(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a CPU the saved activations are in CPU memory already; include_cpu makes the hooks copy
    # them anyway, so the engine's use of them is checked: they move, and the LoRA is the same.
    import core.train.loop as loop_module
    from core.memory.activation_offload import ActivationOffload

    contexts: list[ActivationOffload] = []
    real = loop_module.activation_offload

    def copying(gradient_checkpointing: str) -> Any:
        if gradient_checkpointing != "CPU_OFFLOADED":
            return real(gradient_checkpointing)
        contexts.append(ActivationOffload(include_cpu=True))
        return contexts[-1]

    monkeypatch.setattr(loop_module, "activation_offload", copying)
    outcome = runs.run({"gradient_checkpointing": "CPU_OFFLOADED"}, fresh=True)
    _trained(outcome, 3)
    assert len(contexts) == 3 and all(c.offloaded_tensors > 0 and c.offloaded_bytes > 0 for c in contexts)
    assert all(c.offloaded_tensors < c.saved_tensors for c in contexts), "parameters and repeats are not copied"
    assert lora_equal(runs.run({"gradient_checkpointing": "ON"}), outcome)


def test_two_experts_quantized_and_offloaded(runs: Runs) -> None:
    a14b = build_tiny_model("wan22_a14b", runs.root / "models" / "a14b")
    outcome = runs.run({"base_model": str(a14b), "model_type": "AUTO", "transformer.weight_dtype": "NFLOAT_4",
                        "gradient_checkpointing": "ON", "layer_offload_fraction": 1.0, "max_steps": 4,
                        "objective.timestep_distribution": "UNIFORM", "experts.boundary": 0.5})
    assert outcome.error is None and outcome.steps == 4, outcome.error
    assert sorted(p.name for p in outcome.output.parent.iterdir()) == ["lora_high_noise.safetensors", "lora_low_noise.safetensors"]
    assert set(outcome.run_info["parts"]) == {"transformer", "transformer_2"}
    assert all(set(p["quantized_bytes_by_format"]) == {"nf4"} for p in outcome.run_info["parts"].values())
    experts = [r["expert"] for r in outcome.records]
    assert set(experts) == {"transformer", "transformer_2"}, experts
    # Each expert's two blocks load the first time it runs, and stay in its ring after that.
    firsts = {experts.index(name) for name in set(experts)}
    assert all((outcome.offload_bytes[i] > 0) == (i in firsts) for i in range(4)), (experts, outcome.offload_bytes)


# --------------------------------------------------------------------------------------------------
# The 8 GB preset, the estimate beside the run, out of memory


def test_the_8gb_preset_trains_the_tiny_ti2v_model(runs: Runs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    preset = load_preset("#wan 2.2 LoRA 8GB")
    assert (preset["transformer"]["weight_dtype"], preset["layer_offload_fraction"], preset["gradient_checkpointing"],
            preset["optimizer"]) == ("FLOAT_8", 0.5, "CPU_OFFLOADED", "ADAMW_8BIT")
    model = build_tiny_model("wan22_ti2v_5b", tmp_path / "ti2v")
    config = resolve(preset, {"base_model": str(model), "datasets": [{"path": str(runs.clip)}],
                              "workspace_dir": str(tmp_path / "workspace"), "cache_dir": str(tmp_path / "cache"),
                              "output_path": str(tmp_path / "out" / "lora.safetensors"), "max_steps": 2})
    import core.memory.quantize as quantize_module

    text_quantized: list[str] = []
    real = quantize_module.quantize_model

    def spy(model: Any, weight_dtype: str, *args: Any, **kwargs: Any) -> Any:
        if type(model).__name__ == "UMT5EncoderModel":
            text_quantized.append(weight_dtype)
        return real(model, weight_dtype, *args, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize_model", spy)
    result = Trainer(config).run()
    assert result.steps == 2 and result.output_paths[0].is_file()
    assert text_quantized == ["FLOAT_8"]  # the preset's text_encoder.weight_dtype, while caching
    outcome = Outcome(config, records=[json.loads(line) for line in (tmp_path / "workspace" / "metrics.jsonl").read_text().splitlines()])
    assert outcome.offload_bytes[0] > 0
    assert set(outcome.run_info["parts"]["transformer"]["quantized_bytes_by_format"]) == {"qfloat8_e4m3fn"}
    assert outcome.run_info["estimated_peak_bytes"] > 0


def test_run_info_holds_the_estimate_and_metrics_the_offloaded_bytes(runs: Runs) -> None:
    outcome = runs.run({"transformer.weight_dtype": "FLOAT_8", "max_steps": 2})
    estimate = estimate_module.estimate_memory(outcome.config, estimate_module.model_configs(str(runs.model)))
    assert outcome.run_info["estimated_peak_bytes"] == estimate.peak_bytes > 0
    assert outcome.offload_bytes == [0, 0]


def test_out_of_memory_is_one_line_with_advice(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(WanAdapter, "predict", no_memory)
    monkeypatch.setattr(estimate_module, "detect_vram", lambda: (GIB, "Test GPU"))
    outcome = runs.run({"max_steps": 2}, fresh=True)
    assert isinstance(outcome.error, UserError) and not isinstance(outcome.error, torch.cuda.OutOfMemoryError)
    message = str(outcome.error)
    assert "\n" not in message and message.startswith("out of GPU memory on Test GPU (1.0 GiB"), message
    assert "by the estimate they fit" in message  # the tiny model: something else must hold the memory
    assert not outcome.records and not outcome.output.exists()


def test_the_advice_proposes_settings_that_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wan 2.2 TI2V-5B's real configs (no weights): "#wan 2.2 LoRA" needs about 12.5 GiB.
    known = KNOWN_MODELS["Wan-AI/Wan2.2-TI2V-5B-Diffusers"]
    for name, part in (("transformer", known.transformers[0]), ("text_encoder", known.text_encoder), ("vae", known.vae)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(part), encoding="utf-8")
    (tmp_path / "model_index.json").write_text(json.dumps({"expand_timesteps": known.expand_timesteps}), encoding="utf-8")
    config = load_preset("#wan 2.2 LoRA")
    monkeypatch.setattr(estimate_module, "detect_vram", lambda: (8 * GIB, "Test GPU"))
    error = out_of_memory_error(config, tmp_path)
    assert isinstance(error, ConfigError) and "\n" not in str(error)
    assert " try --set " in str(error) and error.key in str(error)
    fitted = dict(config)
    for change in str(error).split("--set ")[1:]:
        key, value = change.split()[0].split("=")
        section, _, leaf = key.partition(".")
        if leaf:
            fitted[section] = {**fitted[section], leaf: value}
        else:
            fitted[section] = float(value) if section == "layer_offload_fraction" else value
    assert estimate_module.estimate_memory(fitted, configs_from_folder(tmp_path)).fits(8 * GIB)
    monkeypatch.setattr(estimate_module, "detect_vram", lambda: None)
    assert str(out_of_memory_error(config, tmp_path)).startswith("out of GPU memory; lower resolution")
