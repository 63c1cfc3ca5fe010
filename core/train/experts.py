"""Which denoisers a run trains, and which one each optimizer step trains (a two-expert model's;
Routes holds them for the loop).

A model with two experts splits the noise levels at a boundary: the high-noise expert serves sigma in
[boundary, 1], the low-noise one [0, boundary), as its pipeline does when sampling. Each optimizer
step trains exactly one expert: a draw from the run's timestep distribution (seeded by the run's seed
and the step, so every process and every rerun picks the same) says which side the step is on, and
the step's noise levels are then drawn from the distribution mapped into that expert's range (the
same linear map objective.min_timestep/max_timestep use). Only the chosen expert runs and gets
gradients, so the other's LoRA does not change in that step; optimizers leave a parameter without
a gradient untouched (no moment update, no weight decay).

A one-transformer model has one denoiser over [0, 1], and its objective is passed through unchanged.

Noise levels here are the objective's axis s in [0, 1] (core/models/objectives.py), the one the
timestep distributions draw: for flow matching the sigma, for v-prediction floor(s T) is the
timestep. So the ranges, the routing draw and the step's draws need nothing else from the family's
objective.
"""

from __future__ import annotations

import math
from typing import Any

from core.data.dataset import step_seed
from core.errors import ConfigError
from core.models.base import Denoiser, ModelAdapter

from .objective import sample_sigmas

_ONE_TRANSFORMER = "applies to a model with two experts (a high-noise and a low-noise denoiser), and this model has one transformer"


def chosen_denoisers(config: dict[str, Any], adapter: ModelAdapter) -> list[Denoiser]:
    """The denoisers this run trains, highest noise first; settings that cannot apply are refused."""
    experts, objective = config["experts"], config["objective"]
    try:
        available = adapter.denoisers(experts["boundary"])
    except ValueError:
        raise ConfigError(f"experts.boundary {_ONE_TRANSFORMER}; clear it", key="experts.boundary") from None
    if len(available) == 1:
        if experts["train"] != "BOTH":
            raise ConfigError(f"experts.train {experts['train']} {_ONE_TRANSFORMER}; set it to BOTH", key="experts.train")
        return available
    chosen = {"BOTH": available, "HIGH_NOISE": available[:1], "LOW_NOISE": available[-1:]}[experts["train"]]
    low, high = float(objective["min_timestep"]), float(objective["max_timestep"])
    for denoiser in chosen:
        start, end = max(low, denoiser.low), min(high, denoiser.high)
        # An expert below another does not own its upper end (the boundary), the top one owns 1.
        reachable = start < end or (start == end and (denoiser.high >= 1.0 or end < denoiser.high))
        if not reachable:
            others = [d for d in available if d is not denoiser]
            fix = "HIGH_NOISE" if others and others[0].high > denoiser.high else "LOW_NOISE"
            raise ConfigError(
                f"the noise levels objective.min_timestep..max_timestep ({low}..{high}) never reach the "
                f"{denoiser.role} ({denoiser.low}..{denoiser.high}), so it would not train; widen them, or "
                f"set experts.train to {fix}",
                key="experts.train",
                also=("objective.min_timestep", "objective.max_timestep"),
            )
    return chosen


def denoiser_objective(objective: dict[str, Any], denoiser: Denoiser) -> dict[str, Any]:
    """The objective with its noise-level range narrowed to what this denoiser serves."""
    if denoiser.low <= 0.0 and denoiser.high >= 1.0:
        return objective
    low = max(float(objective["min_timestep"]), denoiser.low)
    high = min(float(objective["max_timestep"]), denoiser.high)
    if denoiser.high < 1.0 and high >= denoiser.high:
        # The boundary itself belongs to the expert above it (the pipeline uses t >= boundary).
        high = math.nextafter(denoiser.high, 0.0)
    return {**objective, "min_timestep": low, "max_timestep": max(low, high)}


def route(denoisers: list[Denoiser], objective: dict[str, Any], seed: int, optimizer_step: int) -> int:
    """Index of the denoiser that trains at this optimizer step (0-based step, the same for every
    micro-batch of the step and every process)."""
    if len(denoisers) == 1:
        return 0
    import torch

    generator = torch.Generator(device="cpu").manual_seed(step_seed(seed, optimizer_step, "expert"))
    sigma = float(sample_sigmas(1, objective, generator)[0])
    for index, denoiser in enumerate(denoisers):
        if sigma >= denoiser.low:
            return index
    return len(denoisers) - 1


class ModelView:
    """The model as adapter.predict sees it under DDP: calls go through the wrapper (whose forward
    prepares the gradient all-reduce), attribute reads (config, dtype, ...) go to the model inside,
    which the wrapper does not expose."""

    def __init__(self, wrapper: Any, model: Any) -> None:
        self._wrapper, self._model = wrapper, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class Routes:
    """The denoisers, and which one (with its narrowed objective) an optimizer step uses."""

    def __init__(self, denoisers: list[Any], wrappers: list[Any], models: list[Any], config: dict[str, Any], *,
                 several_in_model: bool, trained: bool) -> None:
        self.denoisers, self.wrappers, self.models = denoisers, wrappers, models
        # What adapter.predict calls: under DDP the wrapper, with attribute reads going to the model.
        self.views = [w if m is w else ModelView(w, m) for w, m in zip(wrappers, models)]
        self.objectives = [denoiser_objective(config["objective"], d) for d in denoisers]
        self.objective, self.seed = config["objective"], config["seed"]
        self.several_in_model = several_in_model
        self.trained = trained  # whether the denoisers train (else they stay in eval mode)
        self._active: int | None = None

    def pick(self, optimizer_step: int) -> tuple[Any, Any, dict[str, Any], dict[str, str]]:
        """(wrapper, view, objective, extra metrics fields) of the denoiser training this step."""
        index = route(self.denoisers, self.objective, self.seed, optimizer_step)
        extra = {"expert": self.denoisers[index].name} if self.several_in_model else {}
        if index != self._active and self.trained:
            # The resting expert keeps eval mode. Only on a change: train() walks every module,
            # about as long as the whole step costs on a tiny model.
            for i, model in enumerate(self.models):
                model.train(i == index)
        self._active = index
        return self.wrappers[index], self.views[index], self.objectives[index], extra

    def model_for_sigma(self, sigma: float) -> Any:
        """The (unwrapped) denoiser serving noise level sigma, for validation outside DDP; None when
        no trained expert serves it (a HIGH_NOISE or LOW_NOISE run): that quantile is left out."""
        for denoiser, model in zip(self.denoisers, self.models):
            if denoiser.low <= sigma <= denoiser.high:
                return model
        return None

    def sampling_denoisers(self) -> dict[str, Any]:
        return {d.name: m for d, m in zip(self.denoisers, self.models)}
