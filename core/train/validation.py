"""Validation loss on the hold-out clips, and the warning that the model has begun to overfit.

Every `validation.every_n_steps` optimizer steps the trainer asks a Validator for the loss of the
model as it is now on the validation clips (core/data/holdout.py chooses them; fill_caches caches
their latents and captions with the training clips'). To make one evaluation comparable with the
next, nothing in it is random:

- the noise levels are fixed: `validation_sigmas` at the quantiles (default 10/30/50/70/90 %) of the
  run's configured timestep distribution;
- the noise is fixed per (run seed, clip, quantile): drawn from a CPU generator seeded by the clip's
  cache key (its content and settings) and the quantile, never from the global RNG or the step;
- each clip is read as its variant 0 (the plain frame selection, no temporal augmentation), and
  a model that also learns image-to-video (adapter.image_to_video) validates as plain
  text-to-video (no clean first frame).

The loss is the plain mean squared error between the prediction and the target of the family's
objective (adapter.objective: noise - latents for flow matching, v for v-prediction), NOT the
training loss: objective.loss_weighting (SIGMA_SQRT weighs sigma 0.1 by 100 and sigma 0.9 by 1.2)
and the temporal-consistency term would make the numbers depend on those settings, so two runs with
different weightings could not be compared, and one low-noise quantile would dominate the mean.
(v-prediction's SNR weighting is the exception that changes nothing here: its weighted x0 error
equals the plain v error, so validation and training measure the same thing.) The per-quantile
values are reported as well, so a change confined to some noise levels stays visible. val_loss is
the mean over quantiles of the mean over clips.

A two-expert model routes each quantile to the expert serving its sigma, as the
pipeline does when sampling (sigma >= boundary: high-noise expert). A quantile that falls to an
expert this run does not train (experts.train HIGH_NOISE or LOW_NOISE) is left out: that expert
is frozen, so its loss could not change.

Evaluation runs under torch.no_grad with the models in eval mode (their train flags are restored
afterwards), one clip and one quantile per forward (no more memory than a training step of batch
size 1), and inside torch.random.fork_rng, so the training run's random stream is the same with
validation on or off.

PlateauWatch reads the validation curve against the smoothed training loss and says once when
validation has stopped improving while training loss keeps falling (the early-stopping sign of
seeds/video-training-notes.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from core.data.dataset import (
    CachedSample,
    CachedSampleDataset,
    MissingCacheEntry,
    collate_batch,
    step_seed,
)
from core.models.base import Denoiser, ModelAdapter

from .objective import validation_sigmas

log = logging.getLogger(__name__)

DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


def quantile_key(quantile: float) -> str:
    """The metrics field of one quantile's loss, by percent: 0.1 -> "val_loss_q10", 0.125 -> "val_loss_q12.5"."""
    percent = round(float(quantile) * 100.0, 6)
    return f"val_loss_q{int(percent) if percent == int(percent) else format(percent, 'g')}"


def should_validate(step: int, config: Mapping[str, Any]) -> bool:
    """Whether the optimizer step just done (1-based) is one that validates."""
    every = int((config.get("validation") or {}).get("every_n_steps") or 0)
    return every > 0 and step > 0 and step % every == 0


def _serving(denoisers: Sequence[tuple[Denoiser, Any]], sigma: float) -> Any | None:
    """The model serving this noise level, or None when no given denoiser serves it. As the pipeline
    and experts.route: the boundary belongs to the expert above it (sigma >= boundary), 1 to the top one."""
    for denoiser, model in denoisers:
        if denoiser.low <= sigma and (sigma < denoiser.high or denoiser.high >= 1.0):
            return model
    return None


class Validator:
    """The validation loss of a run's validation clips at fixed noise levels and fixed noise.

    samples: the plan's validation list (PlannedSample, read through .cached) or CachedSamples.
    autocast: a factory of the context the forward runs in (the trainer's accelerator.autocast).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        config: Mapping[str, Any],
        samples: Sequence[Any],
        cache_dir: str | Path,
        device: torch.device | str = "cpu",
        *,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.adapter, self.device = adapter, torch.device(device)
        self.seed = int(config["seed"])
        cached = [s.cached if hasattr(s, "cached") else s for s in samples]
        self.samples: list[CachedSample] = cached
        # For the kept text encoders (adapter.kept_text_encoders), which encode each batch: planned samples' captions.
        self.captions = [s.item.caption if hasattr(s, "item") else None for s in samples]
        self.dataset = CachedSampleDataset(cached, Path(cache_dir).expanduser())
        self.quantiles = tuple(float(q) for q in quantiles)
        self.keys = tuple(quantile_key(q) for q in self.quantiles)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"quantiles must differ: {list(self.quantiles)}")
        self.sigmas = [float(s) for s in validation_sigmas(config["objective"], self.quantiles)]
        self.objective = adapter.objective(config["objective"])  # its noisy input and target
        self.autocast = autocast or contextlib.nullcontext
        self._missing: set[int] = set()  # clips already reported as missing from the cache
        self._skipped_reported = False

    def __len__(self) -> int:
        return len(self.samples)

    def _noise(self, index: int, key: str, shape: torch.Size) -> torch.Tensor:
        # Seeded by the clip's cache key, not its position: adding or losing a validation clip
        # leaves the others' noise as it was.
        stream = f"validation:{self.samples[index].latent_keys[0]}:{key}"
        generator = torch.Generator(device="cpu").manual_seed(step_seed(self.seed, 0, stream))
        return torch.randn(tuple(shape), generator=generator)

    def _batch(self, index: int) -> dict[str, Any] | None:
        try:
            entry = self.dataset.load(index, 0)
        except MissingCacheEntry as e:
            if index not in self._missing:
                self._missing.add(index)
                log.warning("validation clip left out: %s", e)
            return None
        batch = collate_batch([{**entry, "sample_id": index, "variant": 0, "step": 0}])
        if self.adapter.kept_text_encoders:
            if self.captions[index] is None:
                raise ValueError("validation with kept text encoders needs planned samples (their captions), not cache entries alone")
            batch.update(self.adapter.encode_kept_text([self.captions[index]]))
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def evaluate(self, models: Callable[[float], Any] | Sequence[tuple[Denoiser, Any]]) -> dict[str, float]:
        """{"val_loss": ..., "val_loss_q10": ..., ...} of the models as they are now; {} when there
        is nothing to evaluate (no clips, or no noise level served).

        models: what adapter.predict is called with, per noise level: a callable sigma -> model
        (None: no trained model serves it, leave the quantile out), or (Denoiser, model) pairs,
        routed here by each Denoiser's range. Under DDP give the unwrapped modules: a wrapper's
        forward may talk to the other processes, which are not validating.
        """
        pick = models if callable(models) else functools.partial(_serving, models)
        routed = [(key, sigma, pick(sigma)) for key, sigma in zip(self.keys, self.sigmas)]
        skipped = [key for key, _, model in routed if model is None]
        if skipped and not self._skipped_reported:
            self._skipped_reported = True
            log.info("validation leaves out %s: their noise levels belong to an expert this run does not train", ", ".join(skipped))
        routed = [(key, sigma, model) for key, sigma, model in routed if model is not None]
        if not routed or not self.samples:
            return {}
        used = list({id(model): model for _, _, model in routed}.values())
        flags = [bool(getattr(model, "training", False)) for model in used]
        sums = {key: 0.0 for key, _, _ in routed}
        counts = dict.fromkeys(sums, 0)
        try:
            for model in used:
                model.train(False)
            # fork_rng: nothing here should draw from the global RNG, but a model's forward might
            # (an attention kernel, a layer added later); the training stream must not depend on it.
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                for index in range(len(self.samples)):
                    batch = self._batch(index)
                    if batch is None:
                        continue
                    latents, condition = self.adapter.split_latents(batch["latents"])
                    for key, sigma, model in routed:
                        loss = self._loss(model, latents, condition, batch, key, sigma, index)
                        sums[key] += loss
                        counts[key] += 1
        finally:
            for model, flag in zip(used, flags):
                model.train(flag)
        per_quantile = {key: sums[key] / counts[key] for key in sums if counts[key]}
        if not per_quantile:
            return {}
        return {"val_loss": sum(per_quantile.values()) / len(per_quantile), **per_quantile}

    def _loss(self, model: Any, latents: torch.Tensor, condition: torch.Tensor | None, batch: dict[str, Any],
              key: str, sigma: float, index: int) -> float:
        noise = self._noise(index, key, latents.shape).to(self.device)
        sigmas = torch.full((latents.shape[0],), sigma, dtype=torch.float32, device=self.device)
        noisy = self.objective.noisy(latents, noise, sigmas)
        with self.autocast():
            prediction = self.adapter.predict(model, noisy, sigmas, batch, first_frame_fixed=None, condition=condition)
        return float((prediction.float() - self.objective.target(latents, noise, sigmas)).pow(2).mean())


class PlateauWatch:
    """Says once when validation loss has stopped improving while training loss keeps falling.

    An evaluation improves when val_loss < best * (1 - min_relative_improvement). After `patience`
    evaluations in a row without improvement, if the smoothed training loss has fallen by the same
    margin since the best evaluation, update() returns a one-line warning; it says nothing more
    until validation improves again. When both have stalled the run has converged (or the learning
    rate is too low), which is not overfitting: no warning.
    """

    def __init__(self, patience: int = 3, min_relative_improvement: float = 0.01) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = int(patience)
        self.min_relative_improvement = float(min_relative_improvement)
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_train: float | None = None  # smoothed training loss at the best evaluation
        self.since_best = 0
        self.warned = False

    def update(self, step: int, val_loss: float | None, train_loss_smoothed: float | None) -> str | None:
        if val_loss is None or not math.isfinite(val_loss):
            return None  # a diverged evaluation says nothing about a plateau
        if self.best is None or val_loss < self.best * (1.0 - self.min_relative_improvement):
            self.best, self.best_step, self.best_train = float(val_loss), int(step), train_loss_smoothed
            self.since_best, self.warned = 0, False
            return None
        self.since_best += 1
        if self.warned or self.since_best < self.patience:
            return None
        if train_loss_smoothed is None or self.best_train is None or not math.isfinite(train_loss_smoothed):
            return None
        if not train_loss_smoothed < self.best_train * (1.0 - self.min_relative_improvement):
            return None  # training has stalled too: converged, not overfitting
        self.warned = True
        return (
            f"validation loss has not improved since step {self.best_step} (best {self.best:.4g}, now {val_loss:.4g}) "
            f"while training loss kept falling ({self.best_train:.4g} -> {train_loss_smoothed:.4g}): the model may be "
            f"overfitting; consider stopping or using the backup from step {self.best_step}"
        )

    def state_dict(self) -> dict[str, Any]:
        """For backups, so a resumed run remembers its best validation loss."""
        return {"patience": self.patience, "min_relative_improvement": self.min_relative_improvement,
                "best": self.best, "best_step": self.best_step, "best_train": self.best_train,
                "since_best": self.since_best, "warned": self.warned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.patience = int(state["patience"])
        self.min_relative_improvement = float(state["min_relative_improvement"])
        self.best = None if state["best"] is None else float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        self.best_train = None if state["best_train"] is None else float(state["best_train"])
        self.since_best = int(state["since_best"])
        self.warned = bool(state["warned"])


__all__ = ["DEFAULT_QUANTILES", "PlateauWatch", "Validator", "quantile_key", "should_validate"]
