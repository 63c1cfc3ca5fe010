"""The harness of the engine-settings tests: tiny runs made once per module and compared.

Every run is 2-4 steps of the tiny Wan 2.1 model on cached latents. The model, the clips and one
cache folder are shared by a test module, and a run with given settings is made once and reused by
every test that needs it (see Runs.run). Assertions only compare runs made in this process with the
same code, never stored numbers.
"""


from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from media_factory import make_clip
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import core.train.data_prep as data_prep_module
import core.train.loop as loop_module
import core.train.trainer as trainer_module
from core.config import (
    consistency_problems,
    load_preset,
    resolve,
    set_value,
)
from core.errors import UserError
from core.models.tiny import build_tiny_model
from core.models.wan import WanAdapter
from core.train.events import TrainerCallbacks
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent

# The settings every run of this module starts from, over the "#demo tiny wan LoRA" preset (which
# trains in FLOAT_32 with FLOAT_32 weights, rank 8, alpha 8, at 64 px and 9 frames). repeats 2 gives
# two batches per pass over the one clip, so epochs, batch sizes and repeats show in step counts.
BASE: dict[str, Any] = {
    "max_steps": 3,
    "warmup_steps": 0,
    "learning_rate": 0.001,
    "dataloader_threads": 0,
    "sampling.every_n_steps": 0,
    "backup.every_n_steps": 0,
    "validation.every_n_steps": 0,
}


# --------------------------------------------------------------------------------------------------
# Running the engine and recording what it did


@dataclass
class Outcome:
    """One run: what the engine returned and wrote, and what it did on the way (recorded by spies)."""

    config: dict[str, Any]
    error: UserError | None = None
    steps: int = 0
    skipped: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    batch_losses: list[float] = field(default_factory=list)  # every batch's loss, skipped ones too
    batch_sigmas: list[list[float]] = field(default_factory=list)
    batch_shapes: list[tuple[int, ...]] = field(default_factory=list)  # the model input (B, C, F, H, W)
    checkpointing: list[bool] = field(default_factory=list)  # the model's state at every forward
    activation_contexts: list[str] = field(default_factory=list)  # the context class around every forward
    loader_workers: list[int] = field(default_factory=list)
    latent_keys: list[str] = field(default_factory=list)  # every cached variant the plan trains on
    cache_report: Any = None
    logs: list[tuple[int, str]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]

    @property
    def lrs(self) -> list[float]:
        return [r["lr"] for r in self.records]

    @property
    def timesteps(self) -> list[float]:
        return [r["timestep"] for r in self.records]

    @property
    def output(self) -> Path:
        return Path(self.config["output_path"])

    @property
    def workspace(self) -> Path:
        return Path(self.config["workspace_dir"])

    @property
    def run_info(self) -> dict[str, Any]:
        return json.loads((self.workspace / "run_info.json").read_text(encoding="utf-8"))

    @property
    def offload_bytes(self) -> list[int]:
        return [r["offload_bytes_per_step"] for r in self.records]

    def warnings(self) -> str:
        return "\n".join(message for level, message in self.logs if level >= logging.WARNING)


class _Recorder(TrainerCallbacks):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def on_log(self, level: int, message: str) -> None:
        self.outcome.logs.append((level, message))


def _reset_accelerate() -> None:
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with
    # another mixed precision; this module runs many trainings in one process.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _resolve_values(changes: Mapping[str, Any], env: Runs) -> dict[str, Any]:
    return {k: (v(env) if callable(v) else v) for k, v in changes.items()}


class Runs:
    """The shared model, clips and cache, and memoised runs keyed by their changed settings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = build_tiny_model("wan21", root / "models" / "wan21")
        self.clip = root / "clip"
        self.clip.mkdir()
        make_clip(self.clip / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
        (self.clip / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
        # Another clip with another caption, for datasets.
        self.other = root / "other"
        self.other.mkdir()
        make_clip(self.other / "other.mp4", width=64, height=64, fps=16, seconds=1.0, scene_cuts=(0.4,))
        (self.other / "other.txt").write_text("two scenes, one after the other", encoding="utf-8")
        # The same clip next to a broken file, for strict_data.
        self.with_broken = root / "with-broken"
        self.with_broken.mkdir()
        shutil.copy2(self.clip / "clip.mp4", self.with_broken / "clip.mp4")
        shutil.copy2(self.clip / "clip.txt", self.with_broken / "clip.txt")
        (self.with_broken / "broken.mp4").write_bytes(b"not a video at all" * 100)
        (self.with_broken / "broken.txt").write_text("broken", encoding="utf-8")
        self.cache = root / "cache"
        self._memo: dict[str, Outcome] = {}
        self._count = 0
        self._other_model: Path | None = None

    @property
    def other_model(self) -> Path:
        """A copy of the tiny model whose transformer weights differ (VAE and text encoder are the same)."""
        if self._other_model is None:
            folder = self.root / "models" / "wan21-other"
            shutil.copytree(self.model, folder)
            weights = next((folder / "transformer").glob("*.safetensors"))
            tensors = load_file(weights)
            generator = torch.Generator().manual_seed(1)
            changed = {k: (t + 0.05 * torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype))
                       if t.is_floating_point() else t for k, t in tensors.items()}
            save_file(changed, str(weights), metadata={"format": "pt"})
            self._other_model = folder
        return self._other_model

    def fresh_dir(self, name: str) -> Path:
        self._count += 1
        return self.root / "runs" / f"{self._count:03d}-{name}"

    def config(self, changes: Mapping[str, Any], name: str = "run") -> dict[str, Any]:
        folder = self.fresh_dir(name)
        config = resolve(
            load_preset("#demo tiny wan LoRA"),
            {
                "base_model": str(self.model),
                "datasets": [{"path": str(self.clip), "repeats": 2}],
                "workspace_dir": str(folder / "workspace"),
                "cache_dir": str(self.cache),
                "output_path": str(folder / "out" / "lora.safetensors"),
            },
        )
        for key, value in {**BASE, **_resolve_values(changes, self)}.items():
            set_value(config, key, value)  # checks the value against the schema
        problems = consistency_problems(config)
        assert not problems, problems
        return config

    def run(self, changes: Mapping[str, Any] | None = None, *, fresh: bool = False, reset: bool = True) -> Outcome:
        """Train with BASE plus `changes` (dotted keys; a callable value is called with this object).

        The same changes give the same Outcome object, made once, unless `fresh`.
        """
        changes = dict(changes or {})
        memo_key = json.dumps({k: (v.__name__ if callable(v) else v) for k, v in changes.items()}, sort_keys=True, default=str)
        if not fresh and memo_key in self._memo:
            return self._memo[memo_key]
        config = self.config(changes, name="-".join(changes) or "base")
        outcome = Outcome(config)
        with _spies(outcome):
            if reset:
                _reset_accelerate()
            try:
                result = Trainer(config, _Recorder(outcome)).run()
            except UserError as e:
                outcome.error = e
            else:
                outcome.steps, outcome.skipped = result.steps, result.skipped_steps
        outcome.records = read_metrics(outcome.workspace / "metrics.jsonl")
        if outcome.error is None and outcome.output.exists():
            outcome.lora = load_file(outcome.output)
            with safe_open(str(outcome.output), framework="pt") as handle:
                outcome.metadata = dict(handle.metadata() or {})
        if not fresh:
            self._memo[memo_key] = outcome
        return outcome


class _spies:
    """Wrap the engine's loss, model call, loader and cache filling to record what a run did."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.patches = pytest.MonkeyPatch()

    def __enter__(self) -> None:
        outcome, patches = self.outcome, self.patches
        real_loss = loop_module.training_loss
        real_predict = WanAdapter.predict
        real_loader = trainer_module.make_loader
        real_fill = data_prep_module.fill_caches
        real_activation_offload = loop_module.activation_offload

        def loss(prediction, target, sigmas, objective, weight=0.0, **kwargs):
            value, parts = real_loss(prediction, target, sigmas, objective, weight, **kwargs)
            outcome.batch_losses.append(float(value.detach()))
            outcome.batch_sigmas.append([float(s) for s in sigmas])
            return value, parts

        def predict(self, transformer, noisy, sigmas, batch, **kwargs):
            outcome.batch_shapes.append(tuple(noisy.shape))
            outcome.checkpointing.append(bool(getattr(transformer, "is_gradient_checkpointing", False)))
            return real_predict(self, transformer, noisy, sigmas, batch, **kwargs)

        def loader(*args, **kwargs):
            outcome.loader_workers.append(int(kwargs.get("num_workers", 0)))
            return real_loader(*args, **kwargs)

        def fill(plan, *args, **kwargs):
            report = real_fill(plan, *args, **kwargs)
            outcome.latent_keys = [k for s in plan.train for k in s.latent_keys]
            outcome.cache_report = report
            return report

        def activation_offload(gradient_checkpointing):
            context = real_activation_offload(gradient_checkpointing)
            outcome.activation_contexts.append(type(context).__name__)
            return context

        patches.setattr(loop_module, "training_loss", loss)
        patches.setattr(loop_module, "activation_offload", activation_offload)
        patches.setattr(WanAdapter, "predict", predict)
        patches.setattr(trainer_module, "make_loader", loader)
        patches.setattr(data_prep_module, "fill_caches", fill)

    def __exit__(self, *exc: object) -> None:
        self.patches.undo()


# --------------------------------------------------------------------------------------------------
# Comparisons


def lora_differs(a: Outcome, b: Outcome) -> bool:
    assert a.lora and b.lora, "both runs must have saved a LoRA"
    assert a.lora.keys() == b.lora.keys(), "the runs' LoRA files have different keys"
    return any(not torch.equal(a.lora[k], b.lora[k]) for k in a.lora)


def lora_equal(a: Outcome, b: Outcome) -> bool:
    """The same training: bit for bit on the CPU; on CUDA to rounding (some kernels add in any order)."""
    if a.lora.keys() != b.lora.keys():
        return False
    if not torch.cuda.is_available():
        return all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    return all(torch.allclose(a.lora[k].float(), b.lora[k].float(), rtol=1e-2, atol=1e-5) for k in a.lora)


def same_losses(a: Outcome, b: Outcome) -> bool:
    """Equal loss curves: exactly on the CPU, to rounding on CUDA (as lora_equal)."""
    if not torch.cuda.is_available():
        return a.losses == b.losses
    return len(a.losses) == len(b.losses) and all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(a.losses, b.losses))


def lora_a(outcome: Outcome) -> dict[str, torch.Tensor]:
    return {k: v for k, v in outcome.lora.items() if "lora_A" in k}


def adapter_config(outcome: Outcome) -> dict[str, Any]:
    return json.loads(outcome.metadata["lora_adapter_metadata"])


def _trained(outcome: Outcome, steps: int | None = None) -> None:
    assert outcome.error is None, f"the run failed: {outcome.error}"
    if steps is not None:
        assert outcome.steps == steps, (outcome.steps, steps)
    assert outcome.lora, "no LoRA was saved"
