"""Every setting of the schema is classified: changed and shown live (test_settings_live.py CASES and
the announcements here), refused by name, or listed in ELSEWHERE with the reason and the test that
covers it; `test_every_setting_is_classified` fails as soon as a setting is added without a group.
Also each optimizer and schedule, NaN handling and seeding, and the known gaps in core/ written as
strict xfails (each fails as XPASS once fixed, when its marker must go). Harness: engine_runs.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_runs import (
    ROOT,
    Outcome,
    Runs,
    _trained,
    lora_equal,
    same_losses,
)
from test_settings_live import CASES, _new_folder

import core.train.loop as loop_module
from core.config import (
    iter_settings,
)
from core.errors import ConfigError, UserError

# --------------------------------------------------------------------------------------------------
# (b) Values this engine cannot honour yet: refused before training, by name


@dataclass(frozen=True)
class Refusal:
    key: str
    change: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.key}={next(iter(self.change.values()))}"


def _missing_model(env: Runs) -> str:
    return str(env.root / "no-such-model")


REFUSALS = [
    Refusal("training_method", {"training_method": "FINE_TUNE"}),  # output_path is a LoRA file, FINE_TUNE saves a folder
    Refusal("model_type", {"model_type": "WAN_2_2_TI2V_5B"}),  # not what the folder holds
    # Trainable, but not what the folder holds (every model_type value is trainable now; the folders of
    # families not trained yet, such as Wan 2.1 image-to-video, are refused in tests/test_encoders.py).
    Refusal("model_type", {"model_type": "HIDREAM"}),
    Refusal("model_type", {"model_type": "HUNYUAN_VIDEO"}),  # trainable, but not what the folder holds
    # Parts Wan does not have (Hunyuan Video's second text encoder and distilled guidance: tests/test_hunyuan_video.py;
    # HiDream's third and fourth encoders: tests/test_hidream.py).
    *(Refusal(f"{part}.{key}", {f"{part}.{key}": value})
      for part in ("text_encoder_2", "text_encoder_3", "text_encoder_4")
      for key, value in (("weight_dtype", "FLOAT_8"), ("train", True), ("learning_rate", 0.001))),
    Refusal("text_encoder_4.keep_loaded", {"text_encoder_4.keep_loaded": True}),  # Wan has no fourth encoder
    Refusal("transformer.guidance_scale", {"transformer.guidance_scale": 6.0}),
    Refusal("transformer.moe_aux_loss_weight", {"transformer.moe_aux_loss_weight": 0.01}),  # Wan has no experts
    Refusal("base_model", {"base_model": _missing_model}),
    Refusal("transformer.train", {"transformer.train": False}),
    Refusal("text_encoder.train", {"text_encoder.train": True}),
    Refusal("vae.train", {"vae.train": True}),
    Refusal("vae.weight_dtype", {"vae.weight_dtype": "FLOAT_8"}),
    # Offloading without checkpointing would save nothing (the base trains with checkpointing OFF).
    Refusal("layer_offload_fraction", {"layer_offload_fraction": 0.5, "gradient_checkpointing": "OFF"}),
    Refusal("lora.target_layers", {"lora.target_layers": ["no_such_layer"]}),
    Refusal("lora.decompose", {"lora.decompose": True, "output_format": "COMFY"}),  # ComfyUI decomposes on the other axis
    Refusal("lora.decompose", {"lora.decompose": True, "transformer.weight_dtype": "FLOAT_8"}),  # peft's DoRA cannot read quanto
    Refusal("video_config.spatial_compression_ratio", {"video_config.spatial_compression_ratio": 16}),
    Refusal("video_config.temporal_compression_ratio", {"video_config.temporal_compression_ratio": 8}),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.id for r in REFUSALS])
def test_a_value_the_engine_cannot_honour_is_refused_by_name(runs: Runs, refusal: Refusal) -> None:
    outcome = runs.run(refusal.change)
    assert isinstance(outcome.error, UserError), f"{refusal.id} was not refused"
    error = outcome.error
    # Named in the message, or among the keys the window marks (one message may name two settings).
    named = refusal.key in str(error) or (isinstance(error, ConfigError) and refusal.key in error.keys)
    assert named, f"the message does not name {refusal.key}: {error}"
    assert not outcome.records, "a refused value must stop the run before any step"


# Watched, not trained: samples, backups and validation leave the trained weights exactly as they
# are, and leave their traces (sample videos, backup folders, val_loss in the metrics).
def _samples(outcome: Outcome) -> bool:
    return len(list((outcome.workspace / "samples").glob("step-*.mp4"))) > 0


def _backups(outcome: Outcome) -> bool:
    return len(list((outcome.workspace / "backups").glob("step-*"))) > 0


def _val_loss(outcome: Outcome) -> bool:
    return any("val_loss" in r for r in outcome.records)


_SAMPLE_CHANGE = {"sampling.every_n_steps": 2, "sampling.prompts": ["a red circle"], "sampling.width": 32,
                  "sampling.height": 32, "sampling.frames": 5, "sampling.inference_steps": 2}
WATCHING = {
    "sampling.every_n_steps": (_SAMPLE_CHANGE, _samples),
    "sampling.prompts": (_SAMPLE_CHANGE, _samples),
    "backup.every_n_steps": ({"backup.every_n_steps": 2}, _backups),
    # Validation clips from a folder of their own (the harness trains on one clip).
    "validation.every_n_steps": ({"validation.every_n_steps": 2, "validation.folder": lambda env: str(env.other)}, _val_loss),
}


@pytest.mark.parametrize("key", sorted(WATCHING))
def test_watching_the_run_leaves_the_training_unchanged(runs: Runs, base: Outcome, key: str) -> None:
    change, trace = WATCHING[key]
    outcome = runs.run(change)
    _trained(outcome, 3)
    assert trace(outcome) and not trace(base)
    assert lora_equal(base, outcome), "samples, backups and validation must not change the training"
    assert outcome.losses == base.losses


# --------------------------------------------------------------------------------------------------
# (c) Settings of other parts of the app: not the engine's to change, with the test that covers them

_SAMPLING = "what sample videos look like: tests/test_samples.py::test_samples_are_written_per_prompt_and_training_state_is_untouched"
_EMBEDDING = "textual inversion: tests/test_methods.py::test_embedding_trains_only_the_new_rows_and_loads_back, tests/test_embedding.py"
_EMA = "the average of the trained weights: tests/test_resume.py::test_stopped_and_resumed_run_ends_with_the_same_weights (saved, resumed), tests/test_methods.py::test_embedding_trains_only_the_new_rows_and_loads_back"
ELSEWHERE: dict[str, str] = {
    "transformer.model_path": "single-file checkpoints in every key naming: tests/test_model_sources.py; refused for "
    "two-expert models: tests/test_experts.py::test_a_single_file_checkpoint_is_refused_for_two_experts",
    "experts.train": "Wan 2.2 A14B's experts: tests/test_experts.py (routing, one file per expert, refusal on one-transformer models)",
    "experts.boundary": "Wan 2.2 A14B's split: tests/test_experts.py::test_a_boundary_setting_moves_the_split",
    "objective.image_to_video_share": "TI2V-5B image-to-video: tests/test_image_to_video.py",
    "text_encoder.learning_rate": "the text encoder's rate while FINE_TUNE trains it: tests/test_finetune.py, "
    "tests/test_methods.py::test_fine_tune_with_text_encoder_and_fused_backward_saves_a_pipeline_folder",
    "fused_backward": "FINE_TUNE's optimizer step inside backward: tests/test_finetune.py, "
    "tests/test_methods.py::test_fine_tune_with_text_encoder_and_fused_backward_saves_a_pipeline_folder",
    "ema.enabled": _EMA,
    "ema.decay": _EMA,
    "ema.device": "where the average lives (CPU or GPU; the same numbers): core/train/ema.py; GPU only on CUDA",
    "vae.learning_rate": "means something only while the VAE trains; vae.train is refused",
    "embedding_learning_rate": _EMBEDDING,
    "embedding.placeholder_tokens": _EMBEDDING,
    "embedding.initializer_words": _EMBEDDING,
    "sampling.width": _SAMPLING,
    "sampling.height": _SAMPLING,
    "sampling.frames": _SAMPLING,
    "sampling.inference_steps": _SAMPLING,
    "sampling.guidance_scale": _SAMPLING,
    "sampling.seed": _SAMPLING,
    "backup.keep": "which backups are kept: tests/test_resume.py::test_backup_folder_holds_what_a_resume_needs",
    "validation.holdout_fraction": "which clips are held out: tests/test_holdout.py::test_split_sizes_and_disjointness, "
    "tests/test_doctor.py::test_holdout_and_overfitting_estimate_on_the_demo_dataset",
    "validation.folder": "validation clips from a folder: tests/test_holdout.py::test_validation_folder_replaces_the_fraction",
    "distributed.strategy": "several processes: DDP tests/test_ddp.py, FSDP tests/test_fsdp.py (two CPU processes against one; "
    "what cannot shard refused by name)",
    "distributed.sharding": "FULL_SHARD and SHARD_GRAD_OP tests/test_fsdp.py, HYBRID_SHARD "
    "tests/test_fsdp.py::test_hybrid_shard_over_two_machines_trains_what_one_process_trains",
    "distributed.processes": "the window's launch tests/test_gui_launched_run.py; the estimate's divisor and the refusal of "
    "another launch count tests/test_estimate_fsdp.py",
    "distributed.machines": "HYBRID_SHARD's divisor and the refusal of another machine count: tests/test_estimate_fsdp.py",
}

TESTED = {c.key for c in CASES} | set(WATCHING)
REFUSED = {r.key for r in REFUSALS}


def test_every_setting_is_classified() -> None:
    every = {key for key, _ in iter_settings()}
    classified = TESTED | REFUSED | set(ELSEWHERE)
    assert not (set(ELSEWHERE) & (TESTED | REFUSED)), "a setting the engine tests is not another part's"
    assert every - classified == set(), (
        f"settings no test of this module covers: {sorted(every - classified)}; add a Case (changing it changes the "
        "run), a Refusal (the engine refuses the value by name) or an ELSEWHERE entry with the reason"
    )
    assert classified - every == set(), f"classified settings the schema does not have: {sorted(classified - every)}"


def test_the_tests_cited_for_other_parts_exist() -> None:
    for reason in ELSEWHERE.values():
        for word in reason.replace(",", " ").replace("(", " ").replace(")", " ").split():
            if "::" in word:
                path, name = word.split("::")
                assert f"def {name}(" in (ROOT / path).read_text(encoding="utf-8"), word
            elif word.startswith("test_"):
                assert f"def {word}(" in Path(__file__).read_text(encoding="utf-8"), word


# --------------------------------------------------------------------------------------------------
# Optimizers, schedules, bad losses, reproducibility


@pytest.mark.parametrize("name", ["ADAMW", "ADAMW_8BIT", "ADAFACTOR", "PRODIGY", "SGD"])
def test_each_optimizer_trains(runs: Runs, name: str) -> None:
    # Prodigy estimates its step size; its learning_rate is a multiplier, 1.0 as usual.
    outcome = runs.run({"optimizer": name, "max_steps": 2, **({"learning_rate": 1.0} if name == "PRODIGY" else {})})
    _trained(outcome, 2)
    assert all(math.isfinite(x) for x in outcome.losses)
    ups = [v for k, v in outcome.lora.items() if "lora_B" in k]
    # lora_B starts at zero: any value there is the optimizer's doing.
    assert ups and all(torch.isfinite(v.float()).all() for v in ups)
    assert any(v.abs().max() > 0 for v in ups), f"{name} did not change the LoRA"


def test_schedules_give_different_learning_rates(runs: Runs) -> None:
    names = ["CONSTANT", "LINEAR", "COSINE", "COSINE_WITH_RESTARTS"]
    lrs = {n: tuple(runs.run({"lr_scheduler": n} if n != "CONSTANT" else {}).lrs) for n in names}
    assert len(set(lrs.values())) == len(names), lrs
    assert set(lrs["CONSTANT"]) == {0.001}


def test_a_nan_loss_is_skipped_and_five_in_a_row_stop_the_run(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop_module.training_loss
    calls = {"n": 0, "bad": {1, 2}}

    def sometimes_nan(prediction, target, sigmas, objective, weight=0.0, **kwargs):
        loss, parts = real(prediction, target, sigmas, objective, weight, **kwargs)
        calls["n"] += 1
        if calls["n"] in calls["bad"]:
            return loss * float("nan"), parts
        return loss, parts

    monkeypatch.setattr(loop_module, "training_loss", sometimes_nan)
    outcome = runs.run({"max_steps": 4}, fresh=True)
    # Four batches: the first two are skipped, the other two are steps.
    _trained(outcome, 2)
    assert outcome.skipped == 2 and len(outcome.batch_losses) == 4
    assert [r["step"] for r in outcome.records] == [1, 2]
    assert all(math.isfinite(x) for x in outcome.losses)
    assert outcome.warnings().count("step skipped") == 2

    calls["n"], calls["bad"] = 0, set(range(1, 100))
    outcome = runs.run({"max_steps": 8}, fresh=True)
    assert isinstance(outcome.error, UserError)
    assert "not a number for 5 steps in a row" in str(outcome.error)
    assert len(outcome.batch_losses) == 5 and not outcome.records
    assert not outcome.output.exists()


def test_the_same_seed_gives_the_same_run(runs: Runs, base: Outcome) -> None:
    again = runs.run({}, fresh=True)
    _trained(again, 3)
    assert same_losses(again, base) and again.batch_sigmas == base.batch_sigmas
    assert lora_equal(base, again)


# --------------------------------------------------------------------------------------------------
# Gaps found in core/ and fixed: each test keeps its fix in place.


def test_text_encoder_precision_counts_with_a_warm_cache(runs: Runs, base: Outcome) -> None:
    changed = runs.run({"text_encoder.weight_dtype": "BFLOAT_16"})
    _trained(changed)
    assert changed.cache_report.texts_computed == 1 and changed.losses != base.losses


def test_float16_changes_the_run_or_is_refused(runs: Runs, base: Outcome) -> None:
    changed = runs.run({"train_dtype": "FLOAT_16"})
    if changed.error is not None:
        assert "train_dtype" in str(changed.error)
    else:
        assert changed.losses != base.losses


def test_half_weights_with_float32_training_train_or_are_refused(runs: Runs) -> None:
    changed = runs.run({"transformer.weight_dtype": "BFLOAT_16"})
    if changed.error is not None:
        assert "weight_dtype" in str(changed.error)
    else:
        _trained(changed)


def test_a_part_learning_rate_of_zero_is_zero(runs: Runs) -> None:
    changed = runs.run({"transformer.learning_rate": 0.0, "max_steps": 2})
    _trained(changed, 2)
    assert set(changed.lrs) == {0.0}, changed.lrs


def test_a_bad_output_path_is_refused_before_training(runs: Runs) -> None:
    changed = runs.run({"output_path": _new_folder("out", "lora.txt")})
    assert isinstance(changed.error, UserError)
    assert not changed.records, "the run trained before refusing its output path"


def test_two_runs_with_different_precisions_in_one_process(runs: Runs) -> None:
    runs.run({"max_steps": 1}, fresh=True)
    second = runs.run({"max_steps": 1, "train_dtype": "BFLOAT_16"}, fresh=True, reset=False)
    _trained(second, 1)
