"""Every setting the engine uses is live: changing it changes the training run in the way it should
(the saved LoRA, the metrics, the cached entries, the output file). The classification of every
setting is in test_engine_options.py."""


from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_runs import (
    Outcome,
    Runs,
    _trained,
    adapter_config,
    lora_a,
    lora_differs,
    lora_equal,
    same_losses,
)

from core.errors import UserError
from core.train.metrics_reader import read_metrics

# --------------------------------------------------------------------------------------------------
# (a) Settings whose change must change the run


@dataclass(frozen=True)
class Case:
    key: str
    change: dict[str, Any]
    check: Callable[[Outcome, Outcome], None]  # (run with base_changes, run with base_changes + change)
    base_changes: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def id(self) -> str:
        return self.key + (f"[{self.label}]" if self.label else "")


def different_lora(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert lora_differs(a, b), "the LoRA did not change"


def different_loss(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert a.losses != b.losses and lora_differs(a, b)


def different_timesteps(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert a.batch_sigmas != b.batch_sigmas and a.timesteps != b.timesteps
    assert lora_differs(a, b)


def latent_frames_and_size(frames: int, side: int) -> Callable[[Outcome, Outcome], None]:
    def check(a: Outcome, b: Outcome) -> None:
        _trained(a), _trained(b)
        assert {s[2:] for s in a.batch_shapes} == {(3, 8, 8)}
        assert {s[2:] for s in b.batch_shapes} == {(frames, side, side)}, b.batch_shapes
        assert set(b.latent_keys).isdisjoint(a.latent_keys), "the changed run reused the other run's latents"

    return check


def new_frames_cached(a: Outcome, b: Outcome) -> None:
    # The same sample shape from other frames of the clip: new latents, so another loss.
    _trained(a), _trained(b)
    assert set(b.latent_keys).isdisjoint(a.latent_keys)
    assert b.cache_report.latents_computed >= 1 or b.cache_report.latents_reused >= 1
    assert a.losses != b.losses


def _check_base_model(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert b.latent_keys == a.latent_keys, "the same VAE must reuse the cached latents"
    assert b.cache_report.latents_computed == 0 and b.cache_report.texts_computed == 0
    assert a.losses[0] != b.losses[0], "another transformer must predict something else"


def _check_train_dtype(a: Outcome, b: Outcome) -> None:
    different_loss(a, b)
    assert all(math.isfinite(x) for x in b.losses)


def _check_part_learning_rate(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert set(a.lrs) == {0.001} and set(b.lrs) == {0.003}
    assert lora_differs(a, b)


def _check_learning_rate(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert set(a.lrs) == {0.001} and set(b.lrs) == {0.002}
    assert lora_differs(a, b)


def _check_vae_dtype(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert set(b.latent_keys).isdisjoint(a.latent_keys), "latents of another VAE precision must be cached apart"
    assert b.cache_report.latents_computed + b.cache_report.latents_reused == len(b.latent_keys)
    assert a.losses != b.losses


def _check_text_dtype(a: Outcome, b: Outcome) -> None:
    # Both runs fill their own new cache folder (see the case): the captions are encoded in each
    # precision, so the embeddings, and with them the loss, differ.
    _trained(a), _trained(b)
    assert a.cache_report.texts_computed == 1 and b.cache_report.texts_computed == 1
    assert a.losses != b.losses


def _check_checkpointing(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert a.checkpointing and not any(a.checkpointing)
    assert b.checkpointing and all(b.checkpointing)
    # Recomputing activations is the same arithmetic: the same LoRA (to float rounding).
    for k in a.lora:
        torch.testing.assert_close(a.lora[k].float(), b.lora[k].float(), rtol=0.02, atol=1e-4)


def _check_quantized(fmt: str) -> Callable[[Outcome, Outcome], None]:
    def check(a: Outcome, b: Outcome) -> None:
        different_loss(a, b)
        before, after = a.run_info["parts"]["transformer"], b.run_info["parts"]["transformer"]
        # Only the format: on the tiny model scales outweigh the savings (test_train_memory.py measures those).
        assert before["quantized_bytes_by_format"] == {} and set(after["quantized_bytes_by_format"]) == {fmt}

    return check


def _check_offload(a: Outcome, b: Outcome) -> None:
    # Offloading moves weights, not numbers: the same LoRA, and the bytes it moved in the metrics.
    _trained(a), _trained(b)
    assert a.offload_bytes == [0, 0, 0] and b.offload_bytes[0] > 0, b.offload_bytes
    assert all(b.checkpointing) and lora_equal(a, b)


def _check_activation_offload(a: Outcome, b: Outcome) -> None:
    # On a CPU the saved activations are in CPU memory already: the context runs and moves nothing.
    _trained(a), _trained(b)
    assert set(a.activation_contexts) == {"nullcontext"} and set(b.activation_contexts) == {"ActivationOffload"}
    assert all(b.checkpointing) and lora_equal(a, b)


def _check_quantized_text_encoder(a: Outcome, b: Outcome) -> None:
    # The quantized encoder's embeddings are cached under their own key, never reused from another precision.
    _trained(a), _trained(b)
    assert b.latent_keys == a.latent_keys and b.cache_report.latents_computed == 0
    assert b.cache_report.texts_computed == 1 and a.losses != b.losses


def _check_batch_size(a: Outcome, b: Outcome) -> None:
    _trained(a, 3), _trained(b, 3)
    assert {s[0] for s in a.batch_shapes} == {1} and {s[0] for s in b.batch_shapes} == {2}
    assert lora_differs(a, b)


def _check_accumulation(a: Outcome, b: Outcome) -> None:
    _trained(a, 3), _trained(b, 3)
    assert len(a.batch_losses) == 3 and len(b.batch_losses) == 6
    assert lora_differs(a, b)


def _check_sigmas(predicate: Callable[[float], bool]) -> Callable[[Outcome, Outcome], None]:
    def check(a: Outcome, b: Outcome) -> None:
        different_timesteps(a, b)
        assert all(predicate(s) for batch in b.batch_sigmas for s in batch), b.batch_sigmas

    return check


def _check_weighting(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert a.batch_sigmas == b.batch_sigmas, "the weighting must not change the noise levels"
    assert a.losses != b.losses and lora_differs(a, b)


def _check_steps(steps_a: int, steps_b: int) -> Callable[[Outcome, Outcome], None]:
    def check(a: Outcome, b: Outcome) -> None:
        _trained(a, steps_a), _trained(b, steps_b)
        assert [r["step"] for r in b.records] == list(range(1, steps_b + 1))
        assert len(b.batch_losses) == steps_b

    return check


def _check_epochs(a: Outcome, b: Outcome) -> None:
    # One pass over the clip with repeats 2 is two steps of batch 1: epochs x steps per epoch.
    _check_steps(2, 4)(a, b)
    assert [r["epoch"] for r in b.records] == [0, 0, 1, 1]


def _check_scheduler(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert a.lrs[2] != b.lrs[2], (a.lrs, b.lrs)


def _check_warmup(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert b.lrs[0] < a.lrs[0], (a.lrs, b.lrs)
    assert lora_differs(a, b)


def _check_seed(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert a.batch_sigmas != b.batch_sigmas and a.losses != b.losses
    assert lora_differs(a, b)


def _check_dataset(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert set(b.latent_keys).isdisjoint(a.latent_keys)
    assert a.losses != b.losses


def _check_repeats(a: Outcome, b: Outcome) -> None:
    # stop_after EPOCHS, 1 epoch: as many steps as (item, repeat) pairs at batch 1.
    _check_steps(2, 3)(a, b)


def _check_strict_data(a: Outcome, b: Outcome) -> None:
    _trained(a)
    assert len(a.latent_keys) == 1, "without strict_data the broken file is left out"
    assert isinstance(b.error, UserError) and "strict_data" in str(b.error) and "broken.mp4" in str(b.error)
    assert not b.records


def _check_cache_variants(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert len(set(a.latent_keys)) == 1 and len(set(b.latent_keys)) == 3
    assert a.losses != b.losses  # the second and third uses of the clip are other variants


def _check_fewer_variants(a: Outcome, b: Outcome) -> None:
    _check_cache_variants(b, a)  # the base caches 3 variants, the changed run 1


def _check_random_placement(a: Outcome, b: Outcome) -> None:
    new_frames_cached(a, b)  # other frames than the uniform selection's...
    _check_cache_variants(a, b)  # ...and one placement per cached variant


def _check_threads(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert a.loader_workers == [0] and b.loader_workers == [1]
    assert lora_equal(a, b), "worker processes must not change the batches"


def _check_workspace(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    folder = Path(b.config["workspace_dir"])
    assert folder.name == "elsewhere" and (folder / "metrics.jsonl").is_file() and (folder / "run_info.json").is_file()
    assert len(read_metrics(folder)) == 3


def _check_cache_dir(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    folder = Path(b.config["cache_dir"])
    assert b.cache_report.latents_computed == len(set(b.latent_keys)) == 1 and b.cache_report.texts_computed == 1
    assert any(p.is_file() for p in folder.rglob("*") if p.name != "file-hashes.json")
    assert b.latent_keys == a.latent_keys and same_losses(a, b), "where the cache lives changes nothing else"


def _check_output_path(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert b.output.name == "elsewhere.safetensors" and b.output.is_file()
    assert lora_equal(a, b)


def _check_comfy(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert all(k.startswith("transformer.") for k in a.lora)
    assert all(k.startswith("diffusion_model.") for k in b.lora)
    assert any(k.endswith(".alpha") for k in b.lora) and "lora_adapter_metadata" not in b.metadata


def _check_dora(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    magnitudes = {k for k in b.lora if k.endswith("lora_magnitude_vector")}
    assert magnitudes and not any(k.endswith("lora_magnitude_vector") for k in a.lora)
    assert adapter_config(b)["transformer.use_dora"] is True
    assert b.losses != a.losses or any(not torch.equal(a.lora[k], b.lora[k]) for k in a.lora)


def _check_rank(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert {v.shape[0] for v in lora_a(a).values()} == {8}
    assert {v.shape[0] for v in lora_a(b).values()} == {4}
    assert adapter_config(b)["transformer.r"] == 4


def _check_alpha(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert adapter_config(a)["transformer.lora_alpha"] == 8 and adapter_config(b)["transformer.lora_alpha"] == 16
    assert lora_differs(a, b), "alpha / rank scales the update, so training goes elsewhere"


def _check_targets(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert any(".attn2." in k for k in a.lora)
    assert b.lora and all(".attn1.to_q.lora_" in k for k in b.lora), sorted(b.lora)
    assert b.losses[0] == a.losses[0], "a LoRA starts as the identity whatever its targets"


def _check_temporal_weight(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert a.batch_sigmas == b.batch_sigmas
    assert all(lb < la for la, lb in zip(a.losses[:1], b.losses[:1])), "without the temporal term the loss is the plain MSE"
    assert lora_differs(a, b)


def _check_video_batch(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert {s[0] for s in a.batch_shapes} == {1} and {s[0] for s in b.batch_shapes} == {2}


def _check_augmentation(a: Outcome, b: Outcome) -> None:
    _trained(a), _trained(b)
    assert len(set(a.latent_keys)) == 1 and len(set(b.latent_keys)) > 1
    assert b.latent_keys[0] == a.latent_keys[0], "variant 0 is the plain selection"
    assert a.losses != b.losses


def _other_model(env: Runs) -> str:
    return str(env.other_model)


def _other_dataset(env: Runs) -> list[dict[str, Any]]:
    return [{"path": str(env.other), "repeats": 2}]


def _broken_dataset(env: Runs) -> list[dict[str, Any]]:
    return [{"path": str(env.with_broken), "repeats": 2}]


def _repeats(n: int) -> Callable[[Runs], list[dict[str, Any]]]:
    def value(env: Runs) -> list[dict[str, Any]]:
        return [{"path": str(env.clip), "repeats": n}]

    value.__name__ = f"clip-repeats-{n}"
    return value


def _new_folder(name: str, file: str | None = None) -> Callable[[Runs], str]:
    def value(env: Runs) -> str:
        folder = env.root / "elsewhere" / name
        return str(folder / file) if file else str(folder)

    value.__name__ = f"{name}/{file}"
    return value


EPOCH = {"stop_after": "EPOCHS", "epochs": 1}
# random places the 9-frame window anywhere in the 16 frames of the clip, once per cached variant.
RANDOM = {"video_config.frame_sample_strategy": "random", "cache_variants": 3}

CASES = [
    Case("base_model", {"base_model": _other_model}, _check_base_model),
    Case("train_dtype", {"train_dtype": "BFLOAT_16"}, _check_train_dtype),
    Case("transformer.learning_rate", {"transformer.learning_rate": 0.003}, _check_part_learning_rate),
    Case("transformer.weight_dtype", {"transformer.weight_dtype": "BFLOAT_16"}, different_loss,
         base_changes={"train_dtype": "BFLOAT_16"}),
    Case("transformer.weight_dtype", {"transformer.weight_dtype": "FLOAT_8"}, _check_quantized("qfloat8_e4m3fn"),
         base_changes={"train_dtype": "BFLOAT_16", "transformer.weight_dtype": "BFLOAT_16"}, label="FLOAT_8"),
    Case("transformer.weight_dtype", {"transformer.weight_dtype": "NFLOAT_4"}, _check_quantized("nf4"),
         base_changes={"train_dtype": "BFLOAT_16", "transformer.weight_dtype": "BFLOAT_16"}, label="NFLOAT_4"),
    Case("text_encoder.weight_dtype", {"text_encoder.weight_dtype": "FLOAT_8"}, _check_quantized_text_encoder, label="FLOAT_8"),
    Case("text_encoder.weight_dtype", {"text_encoder.weight_dtype": "BFLOAT_16", "cache_dir": _new_folder("text-bf16")},
         _check_text_dtype, base_changes={"cache_dir": _new_folder("text-fp32")}),
    Case("vae.weight_dtype", {"vae.weight_dtype": "BFLOAT_16"}, _check_vae_dtype),
    Case("gradient_checkpointing", {"gradient_checkpointing": "ON"}, _check_checkpointing),
    Case("gradient_checkpointing", {"gradient_checkpointing": "CPU_OFFLOADED"}, _check_activation_offload,
         base_changes={"gradient_checkpointing": "ON"}, label="CPU_OFFLOADED"),
    Case("layer_offload_fraction", {"layer_offload_fraction": 0.5}, _check_offload, base_changes={"gradient_checkpointing": "ON"}),
    Case("batch_size", {"batch_size": 2}, _check_batch_size, base_changes={"video_config.video_batch_size_multiplier": 1.0}),
    Case("gradient_accumulation_steps", {"gradient_accumulation_steps": 2}, _check_accumulation),
    Case("learning_rate", {"learning_rate": 0.002}, _check_learning_rate),
    Case("objective.timestep_distribution", {"objective.timestep_distribution": "UNIFORM"}, different_timesteps),
    Case("objective.timestep_shift", {"objective.timestep_shift": 8.0}, different_timesteps),
    Case("objective.logit_mean", {"objective.logit_mean": 1.5}, different_timesteps,
         base_changes={"objective.timestep_distribution": "LOGIT_NORMAL"}),
    Case("objective.logit_std", {"objective.logit_std": 2.5}, different_timesteps,
         base_changes={"objective.timestep_distribution": "LOGIT_NORMAL"}),
    Case("objective.sigmoid_scale", {"objective.sigmoid_scale": 2.5}, different_timesteps),
    Case("objective.min_timestep", {"objective.min_timestep": 0.6}, _check_sigmas(lambda s: s >= 0.6)),
    Case("objective.max_timestep", {"objective.max_timestep": 0.4}, _check_sigmas(lambda s: s <= 0.4)),
    Case("objective.loss_weighting", {"objective.loss_weighting": "COSMAP"}, _check_weighting),
    Case("stop_after", {"stop_after": "EPOCHS"}, _check_steps(3, 2), base_changes={"epochs": 1}),
    Case("max_steps", {"max_steps": 2}, _check_steps(3, 2)),
    Case("epochs", {"epochs": 2}, _check_epochs, base_changes=EPOCH),
    Case("max_grad_norm", {"max_grad_norm": 1e-6}, different_lora),
    Case("optimizer", {"optimizer": "SGD"}, different_lora),
    Case("optimizer_settings.weight_decay", {"optimizer_settings.weight_decay": 0.5}, different_lora),
    Case("optimizer_settings.beta1", {"optimizer_settings.beta1": 0.5}, different_lora),
    Case("optimizer_settings.beta2", {"optimizer_settings.beta2": 0.5}, different_lora),
    Case("optimizer_settings.eps", {"optimizer_settings.eps": 1e-3}, different_lora),
    Case("optimizer_settings.momentum", {"optimizer_settings.momentum": 0.0}, different_lora, base_changes={"optimizer": "SGD"}),
    Case("objective.offset_noise_weight", {"objective.offset_noise_weight": 0.5}, different_loss),
    Case("lr_scheduler", {"lr_scheduler": "COSINE"}, _check_scheduler),
    Case("warmup_steps", {"warmup_steps": 2}, _check_warmup),
    Case("seed", {"seed": 7}, _check_seed),
    Case("resolution", {"resolution": 96}, latent_frames_and_size(3, 12)),
    Case("frames", {"frames": 5}, latent_frames_and_size(2, 8)),
    Case("datasets", {"datasets": _other_dataset}, _check_dataset, label="path"),
    Case("datasets", {"datasets": _repeats(3)}, _check_repeats, base_changes=EPOCH, label="repeats"),
    Case("strict_data", {"strict_data": True}, _check_strict_data, base_changes={"datasets": _broken_dataset}),
    Case("cache_variants", {"cache_variants": 1}, _check_fewer_variants, base_changes=RANDOM),
    Case("dataloader_threads", {"dataloader_threads": 1}, _check_threads),
    Case("workspace_dir", {"workspace_dir": _new_folder("elsewhere")}, _check_workspace),
    Case("cache_dir", {"cache_dir": _new_folder("cache")}, _check_cache_dir),
    Case("output_path", {"output_path": _new_folder("out", "elsewhere.safetensors")}, _check_output_path),
    Case("output_format", {"output_format": "COMFY"}, _check_comfy),
    Case("lora.rank", {"lora.rank": 4}, _check_rank),
    Case("lora.alpha", {"lora.alpha": 16.0}, _check_alpha),
    Case("lora.dropout", {"lora.dropout": 0.5}, different_lora),
    Case("lora.decompose", {"lora.decompose": True}, _check_dora),
    Case("lora.target_layers", {"lora.target_layers": ["attn1.to_q"]}, _check_targets),
    Case("video_config.max_frames", {"video_config.max_frames": 16}, new_frames_cached),
    Case("video_config.frame_sample_strategy", {"video_config.frame_sample_strategy": "random"}, _check_random_placement,
         base_changes={"cache_variants": 3}),
    Case("video_config.target_fps", {"video_config.target_fps": 8.0}, latent_frames_and_size(2, 8)),
    Case("video_config.max_duration", {"video_config.max_duration": 0.4}, latent_frames_and_size(2, 8)),
    Case("video_config.temporal_consistency_weight", {"video_config.temporal_consistency_weight": 0.0}, _check_temporal_weight),
    Case("video_config.video_batch_size_multiplier", {"video_config.video_batch_size_multiplier": 1.0}, _check_video_batch,
         base_changes={"batch_size": 2}),
    Case("video_config.use_temporal_attention", {"video_config.use_temporal_attention": False}, different_loss),
    Case("video_config.frame_dropout_probability", {"video_config.frame_dropout_probability": 0.3}, different_loss),
    Case("video_config.temporal_augmentation", {"video_config.temporal_augmentation": True}, _check_augmentation,
         base_changes={"cache_variants": 3}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_changed_setting_changes_the_run(runs: Runs, base: Outcome, case: Case) -> None:
    before = runs.run(case.base_changes) if case.base_changes else base
    after = runs.run({**case.base_changes, **case.change})
    case.check(before, after)
