"""Every setting is live: changing any setting of the schema changes the training run in the way it
should (the saved LoRA, the metrics, the cached entries, the output file), or the engine refuses the
value with a message naming the key, or the setting belongs to another part of the app and is listed
in ELSEWHERE with the reason and the test that covers it. `test_every_setting_is_classified` fails
as soon as a setting is added to the schema without being put in one of these groups.

Every run is 2-4 steps of the tiny Wan 2.1 model on cached latents. The model, the clips and one
cache folder are shared by the whole module, and a run with given settings is made once and reused
by every test that needs it (see Runs.run), so each run costs about a second once the cache is warm.
Assertions only compare runs made in this process with the same code, never stored numbers.

What the engine gets wrong today is written as strict xfails at the end ("Known gaps in core/"): each
names the file at fault, and passes (so fails as XPASS) once it is fixed, when its marker must go.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from media_factory import make_clip
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import core.train.trainer as trainer_module
from core.config import consistency_problems, iter_settings, load_preset, resolve, set_value
from core.errors import ConfigError, UserError
from core.models.tiny import build_tiny_model
from core.models.wan import WanAdapter
from core.train.events import TrainerCallbacks
from core.train.telemetry import read_metrics
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
        real_loss = trainer_module.flow_matching_loss
        real_predict = WanAdapter.predict
        real_loader = trainer_module.make_loader
        real_fill = trainer_module.fill_caches

        def loss(prediction, target, sigmas, objective, weight=0.0):
            value, parts = real_loss(prediction, target, sigmas, objective, weight)
            outcome.batch_losses.append(float(value.detach()))
            outcome.batch_sigmas.append([float(s) for s in sigmas])
            return value, parts

        def predict(self, transformer, noisy, sigmas, batch):
            outcome.batch_shapes.append(tuple(noisy.shape))
            outcome.checkpointing.append(bool(getattr(transformer, "is_gradient_checkpointing", False)))
            return real_predict(self, transformer, noisy, sigmas, batch)

        def loader(*args, **kwargs):
            outcome.loader_workers.append(int(kwargs.get("num_workers", 0)))
            return real_loader(*args, **kwargs)

        def fill(plan, *args, **kwargs):
            report = real_fill(plan, *args, **kwargs)
            outcome.latent_keys = [k for s in plan.train for k in s.latent_keys]
            outcome.cache_report = report
            return report

        patches.setattr(trainer_module, "flow_matching_loss", loss)
        patches.setattr(WanAdapter, "predict", predict)
        patches.setattr(trainer_module, "make_loader", loader)
        patches.setattr(trainer_module, "fill_caches", fill)

    def __exit__(self, *exc: object) -> None:
        self.patches.undo()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    # One intra-op thread: the tiny model's operations are far too small to share, and on a busy
    # two-core machine spinning worker threads made runs up to ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Runs(tmp_path_factory.mktemp("engine-options"))
    finally:
        torch.set_num_threads(threads)
        _reset_accelerate()  # the next module's runs start from a clean accelerate state


@pytest.fixture(scope="module")
def base(runs: Runs) -> Outcome:
    outcome = runs.run()
    assert outcome.error is None and outcome.steps == 3, outcome.error
    return outcome


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
    Case("text_encoder.weight_dtype", {"text_encoder.weight_dtype": "BFLOAT_16", "cache_dir": _new_folder("text-bf16")},
         _check_text_dtype, base_changes={"cache_dir": _new_folder("text-fp32")}),
    Case("vae.weight_dtype", {"vae.weight_dtype": "BFLOAT_16"}, _check_vae_dtype),
    Case("gradient_checkpointing", {"gradient_checkpointing": "ON"}, _check_checkpointing),
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
    Case("lora.target_layers", {"lora.target_layers": ["attn1.to_q"]}, _check_targets),
    Case("video_config.max_frames", {"video_config.max_frames": 16}, new_frames_cached),
    Case("video_config.frame_sample_strategy", {"video_config.frame_sample_strategy": "random"}, _check_random_placement,
         base_changes={"cache_variants": 3}),
    Case("video_config.target_fps", {"video_config.target_fps": 8.0}, latent_frames_and_size(2, 8)),
    Case("video_config.max_duration", {"video_config.max_duration": 0.4}, latent_frames_and_size(2, 8)),
    Case("video_config.temporal_consistency_weight", {"video_config.temporal_consistency_weight": 0.0}, _check_temporal_weight),
    Case("video_config.video_batch_size_multiplier", {"video_config.video_batch_size_multiplier": 1.0}, _check_video_batch,
         base_changes={"batch_size": 2}),
    Case("video_config.frame_dropout_probability", {"video_config.frame_dropout_probability": 0.3}, different_loss),
    Case("video_config.temporal_augmentation", {"video_config.temporal_augmentation": True}, _check_augmentation,
         base_changes={"cache_variants": 3}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_changed_setting_changes_the_run(runs: Runs, base: Outcome, case: Case) -> None:
    before = runs.run(case.base_changes) if case.base_changes else base
    after = runs.run({**case.base_changes, **case.change})
    case.check(before, after)


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
    Refusal("training_method", {"training_method": "FINE_TUNE"}),
    Refusal("training_method", {"training_method": "EMBEDDING"}),
    Refusal("model_type", {"model_type": "WAN_2_2_TI2V_5B"}),  # not what the folder holds
    Refusal("model_type", {"model_type": "HUNYUAN_VIDEO"}),  # not trainable yet
    Refusal("base_model", {"base_model": _missing_model}),
    Refusal("transformer.train", {"transformer.train": False}),
    Refusal("transformer.weight_dtype", {"transformer.weight_dtype": "INT_8"}),
    Refusal("text_encoder.train", {"text_encoder.train": True}),
    Refusal("text_encoder.weight_dtype", {"text_encoder.weight_dtype": "NFLOAT_4"}),
    Refusal("vae.train", {"vae.train": True}),
    Refusal("vae.weight_dtype", {"vae.weight_dtype": "FLOAT_8"}),
    Refusal("layer_offload_fraction", {"layer_offload_fraction": 0.5}),
    Refusal("gradient_checkpointing", {"gradient_checkpointing": "CPU_OFFLOADED"}),
    Refusal("lora.target_layers", {"lora.target_layers": ["no_such_layer"]}),
    Refusal("video_config.use_temporal_attention", {"video_config.use_temporal_attention": False}),
    Refusal("video_config.spatial_compression_ratio", {"video_config.spatial_compression_ratio": 16}),
    Refusal("video_config.temporal_compression_ratio", {"video_config.temporal_compression_ratio": 8}),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.id for r in REFUSALS])
def test_a_value_the_engine_cannot_honour_is_refused_by_name(runs: Runs, refusal: Refusal) -> None:
    outcome = runs.run(refusal.change)
    assert isinstance(outcome.error, UserError), f"{refusal.id} was not refused"
    error, section, _, leaf = outcome.error, *refusal.key.rpartition(".")
    named = refusal.key in str(error) or (isinstance(error, ConfigError) and refusal.key in error.keys)
    # "video_config.spatial_compression_ratio/temporal_compression_ratio" names both keys
    named = named or (bool(section) and f"{section}." in str(error) and leaf in str(error))
    assert named, f"the message does not name {refusal.key}: {error}"
    assert not outcome.records, "a refused value must stop the run before any step"


# Announced: the engine warns that the feature is not available yet; training is unaffected.
ANNOUNCED = {
    "sampling.every_n_steps": ({"sampling.every_n_steps": 2, "sampling.prompts": ["a red circle"]}, "sampling"),
    "sampling.prompts": ({"sampling.every_n_steps": 2, "sampling.prompts": ["a red circle"]}, "sampling"),
    "backup.every_n_steps": ({"backup.every_n_steps": 2}, "backups"),
    "validation.every_n_steps": ({"validation.every_n_steps": 2}, "validation"),
}


@pytest.mark.parametrize("key", sorted(ANNOUNCED))
def test_a_feature_not_available_yet_is_announced(runs: Runs, base: Outcome, key: str) -> None:
    change, word = ANNOUNCED[key]
    outcome = runs.run(change)
    _trained(outcome, 3)
    assert word in outcome.warnings() and "not available yet" in outcome.warnings(), outcome.warnings()
    assert word not in base.warnings()
    assert lora_equal(base, outcome), "an announced feature must not change the training"


# --------------------------------------------------------------------------------------------------
# (c) Settings of other parts of the app: not the engine's to change, with the test that covers them

_SAMPLING = "sample videos: the engine announces that sampling is not available yet (test_a_feature_not_available_yet_is_announced)"
_EMBEDDING = "EMBEDDING only, and training_method EMBEDDING is refused (test_a_value_the_engine_cannot_honour_is_refused_by_name)"
ELSEWHERE: dict[str, str] = {
    "text_encoder.learning_rate": "means something only while the text encoder trains; text_encoder.train is refused",
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
    "backup.keep": "which backups to keep: the engine announces that backups are not available yet",
    "validation.holdout_fraction": "which clips are held out: tests/test_holdout.py::test_split_sizes_and_disjointness, "
    "tests/test_doctor.py::test_holdout_and_overfitting_estimate_on_the_demo_dataset",
    "validation.folder": "validation clips from a folder: tests/test_holdout.py::test_validation_folder_replaces_the_fraction",
}

TESTED = {c.key for c in CASES} | set(ANNOUNCED)
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
    real = trainer_module.flow_matching_loss
    calls = {"n": 0, "bad": {1, 2}}

    def sometimes_nan(prediction, target, sigmas, objective, weight=0.0):
        loss, parts = real(prediction, target, sigmas, objective, weight)
        calls["n"] += 1
        if calls["n"] in calls["bad"]:
            return loss * float("nan"), parts
        return loss, parts

    monkeypatch.setattr(trainer_module, "flow_matching_loss", sometimes_nan)
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
# Known gaps in core/: each is a strict xfail, so the fix makes it pass and the marker must go.


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


@pytest.mark.xfail(strict=True, raises=ValueError, reason="accelerate's AcceleratorState outlives a run "
                   "(core/train/trainer.py run creates an Accelerator and never resets it): a second run "
                   "in the same process with another train_dtype fails with a ValueError")
def test_two_runs_with_different_precisions_in_one_process(runs: Runs) -> None:
    runs.run({"max_steps": 1}, fresh=True)
    second = runs.run({"max_steps": 1, "train_dtype": "BFLOAT_16"}, fresh=True, reset=False)
    _trained(second, 1)
