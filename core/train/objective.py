"""Which noise levels a step trains, and the loss composed from what the family's objective says.

The noise level ``s`` in [0, 1] is the axis every part of training shares (0 clean, 1 the most
noise trained): the distributions here draw it, ``objective.min_timestep`` / ``max_timestep``
bound it, a two-expert model's denoisers split it, and validation fixes it at quantiles. What s
means for a model (its noisy input, target, loss weight and timestep input) is the family's
objective, core/models/objectives.py, which the adapter names (``ModelAdapter.objective``): flow
matching, where s is the flow sigma itself, or DDPM v-prediction, where s maps to the schedule's
integer timesteps. This module keeps what is the same for every objective: the
draws, the validation quantiles and the loss composition (the weighted MSE, the temporal
consistency term, leaving out a clean first frame).

Everything here is a plain function of tensors and the ``objective`` section of a config (a dict as
``core.config`` resolves it; missing keys take the schema's defaults). Sampling uses only the
caller's ``torch.Generator``, so a seeded run draws the same noise levels every time.

Where diffusers already has the formula (SD3's ``compute_density_for_timestep_sampling``) it is
used rather than rewritten. ``diffusers.training_utils`` takes seconds to import, so it is imported
on first use, not with this module.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from core.models.objectives import FLOW_MATCHING_WEIGHTINGS, WEIGHTINGS, FlowMatching, Objective

DISTRIBUTIONS = ("UNIFORM", "LOGIT_NORMAL", "SIGMOID", "SHIFTED")


def _training_utils() -> Any:
    # Imported late: diffusers.training_utils pulls in diffusers' models (seconds on a small CPU).
    from diffusers import training_utils

    return training_utils


@functools.lru_cache(maxsize=1)
def _objective_defaults() -> dict[str, Any]:
    # Once per process: section_defaults copies the schema's values, and every step draws.
    from core.config.settings import lookup, section_defaults

    return section_defaults(lookup("objective"))  # type: ignore[arg-type]


def _settings(objective: dict[str, Any]) -> dict[str, Any]:
    """The objective section with every key present, checked; missing keys take the schema's defaults."""
    merged = {**_objective_defaults(), **objective}
    if merged["timestep_distribution"] not in DISTRIBUTIONS:
        raise ValueError(
            f"objective.timestep_distribution is {merged['timestep_distribution']!r}; expected one of {', '.join(DISTRIBUTIONS)}"
        )
    if merged["loss_weighting"] not in WEIGHTINGS:
        raise ValueError(f"objective.loss_weighting is {merged['loss_weighting']!r}; expected one of {', '.join(WEIGHTINGS)}")
    lo, hi = float(merged["min_timestep"]), float(merged["max_timestep"])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"objective.min_timestep ({lo}) and max_timestep ({hi}) must satisfy 0 <= min <= max <= 1")
    return merged


def _shift(u: torch.Tensor, shift: float) -> torch.Tensor:
    # The flow-shift of FlowMatchEulerDiscreteScheduler (and the flow-matching families' samplers):
    # sigma' = shift * sigma / (1 + (shift - 1) * sigma). Monotonic, keeps 0 -> 0 and 1 -> 1, and
    # above 1 moves mass towards high noise, where a sampler with the same shift spends its steps.
    return shift * u / (1.0 + (shift - 1.0) * u)


def _to_range(u: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    # Restriction to [min, max] by a linear map rather than rejection sampling: the distribution
    # keeps its shape (squeezed into the range), the cost is fixed, and the draw consumes the
    # generator the same way whatever the range, so changing the range never shifts later draws.
    # The clamp only removes float rounding past the ends.
    lo, hi = float(settings["min_timestep"]), float(settings["max_timestep"])
    return (lo + u * (hi - lo)).clamp(*_float32_bounds(lo, hi))


@functools.lru_cache(maxsize=64)
def _float32_bounds(lo: float, hi: float) -> tuple[float, float]:
    # The float32 values nearest to [lo, hi] from inside: float32(0.1) is 0.10000000149 > 0.1, so
    # clamping to float32(hi) could still exceed the configured max by a rounding step.
    lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    if float(lo32) < lo:
        lo32 = torch.nextafter(lo32, torch.tensor(math.inf))
    if float(hi32) > hi:
        hi32 = torch.nextafter(hi32, torch.tensor(-math.inf))
    if lo32 > hi32:  # no float32 inside a range this narrow: the nearest one will do
        lo32 = hi32 = torch.tensor(lo, dtype=torch.float32)
    return float(lo32), float(hi32)


def sample_sigmas(
    batch_size: int,
    objective: dict[str, Any],
    generator: torch.Generator | list[torch.Generator],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one noise level per sample, (batch_size,) float32 in [min_timestep, max_timestep].

    UNIFORM: u ~ U(0, 1). LOGIT_NORMAL: sigmoid(N(logit_mean, logit_std)). SIGMOID:
    sigmoid(sigmoid_scale * N(0, 1)). SHIFTED: the SIGMOID draw, then the flow shift by
    timestep_shift. Then u is mapped linearly into [min_timestep, max_timestep].

    ``generator`` may be a list of batch_size generators, one per sample (each draws its sample's
    value, as a call with batch_size 1 would; the mapping then runs once for the batch).

    The draw happens on the generator's device and is then moved to ``device`` (default: the
    generator's), so a seed gives the same sigmas whichever device the batch lives on.
    """
    settings = _settings(objective)
    density = _training_utils().compute_density_for_timestep_sampling
    kind = settings["timestep_distribution"]
    generators = generator if isinstance(generator, list) else [generator]
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"{len(generator)} generators for a batch of {batch_size}")
    per_call = 1 if isinstance(generator, list) else batch_size
    draw_device = generators[0].device
    if kind == "UNIFORM":
        options: dict[str, Any] = {"weighting_scheme": "uniform"}
    elif kind == "LOGIT_NORMAL":
        options = {"weighting_scheme": "logit_normal", "logit_mean": float(settings["logit_mean"]),
                   "logit_std": float(settings["logit_std"])}
    else:  # SIGMOID and SHIFTED: sigmoid(scale * N(0, 1)) is logit-normal with mean 0 and std = scale.
        options = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": float(settings["sigmoid_scale"])}
    u = torch.cat([density(batch_size=per_call, device=draw_device, generator=g, **options) for g in generators])
    if kind == "SHIFTED":
        u = _shift(u, float(settings["timestep_shift"]))
    sigmas = _to_range(u.float(), settings)
    return sigmas.to(device if device is not None else draw_device)


def validation_sigmas(
    objective: dict[str, Any],
    quantiles: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fixed noise levels at the given quantiles of the configured distribution, float32 (len(quantiles),).

    For a validation loss that is comparable from one evaluation to the next. Every transform
    after the base draw (sigmoid, shift, the linear map into [min, max]) is increasing, so a
    quantile of the result is the transform of the base draw's quantile: UNIFORM's q-quantile is q;
    the others' is sigmoid(mean + std * Phi^-1(q)) (then the shift for SHIFTED), then the map.
    """
    settings = _settings(objective)
    q = torch.tensor([float(x) for x in quantiles], dtype=torch.float64)
    if q.numel() and not bool(((q >= 0) & (q <= 1)).all()):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    kind = settings["timestep_distribution"]
    # float64 for the inverse normal CDF: near 0 and 1 float32 loses the tails' digits.
    if kind == "UNIFORM":
        u = q
    else:
        if kind == "LOGIT_NORMAL":
            mean, std = float(settings["logit_mean"]), float(settings["logit_std"])
        else:
            mean, std = 0.0, float(settings["sigmoid_scale"])
        u = torch.sigmoid(mean + std * torch.special.ndtri(q))  # ndtri(0|1) = -inf|inf -> sigmoid 0|1
        if kind == "SHIFTED":
            u = _shift(u, float(settings["timestep_shift"]))
    return _to_range(u.float(), settings).to(device if device is not None else "cpu")


def _flow_matching(objective: dict[str, Any]) -> FlowMatching:
    """Flow matching for an objective section, for the functions below that take a section. A
    weighting of another objective (SNR) is a ValueError here, like the other values _settings
    refuses; a run meets it earlier, as the ConfigError of ModelAdapter.objective."""
    weighting = _settings(objective)["loss_weighting"]
    if weighting not in FLOW_MATCHING_WEIGHTINGS:
        raise ValueError(f"objective.loss_weighting is {weighting!r}; flow matching takes {', '.join(FLOW_MATCHING_WEIGHTINGS)}")
    return FlowMatching(weighting)


def loss_weights(sigmas: torch.Tensor, objective: dict[str, Any]) -> torch.Tensor:
    """Flow matching's per-sample loss weights (B,) float32: NONE -> 1, SIGMA_SQRT -> 1 / sigma^2,
    COSMAP -> 2 / (pi (1 - 2 sigma + 2 sigma^2)); ``FlowMatching.weight`` for this section."""
    return _flow_matching(objective).weight(sigmas)


def condition_first_frame(noisy: torch.Tensor, latents: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Image-to-video training input: for the samples where ``fixed`` (B,) is True the first latent
    frame is the clean latent (the conditioning image), as an image-to-video pipeline with per-token
    timesteps feeds it (``latents = (1 - first_frame_mask) * condition + first_frame_mask * latents``)."""
    keep = fixed.to(device=noisy.device, dtype=torch.bool).reshape(-1, 1, 1, 1, 1)
    first = torch.arange(noisy.shape[2], device=noisy.device).reshape(1, 1, -1, 1, 1) == 0
    return torch.where(keep & first, latents.to(noisy.dtype), noisy)


def _frame_mean(values: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of (B, C, F, H, W) values over the frames weighted 1 in ``frames`` (B, F)."""
    per_frame = values.mean(dim=(1, 3, 4))  # (B, F)
    return (per_frame * frames).sum(dim=1) / frames.sum(dim=1).clamp_min(1.0)


def _weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (per_sample * weights.to(per_sample.device)).mean()


def training_loss(
    prediction: torch.Tensor,
    target: torch.Tensor | None,
    sigmas: torch.Tensor,
    objective: Objective,
    temporal_consistency_weight: float = 0.0,
    first_frame_fixed: torch.Tensor | None = None,
    *,
    latents: torch.Tensor | None = None,
    noisy: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss (a scalar float32 tensor) and its parts for logging, for any objective.

    The objective says which two tensors are compared (``loss_pair``: the prediction and
    ``target``, or for SNR the x0 estimate and the clean ``latents``, which needs ``noisy``, the
    input the denoiser saw) and their per-sample weights (``weight(sigmas)``). ``target`` may be
    None where the objective does not read it (``objective.needs_target``).

    mse: per-sample mean squared error over (C, F, H, W), times the weight, mean over the batch.
    temporal: ``temporal_consistency_weight`` times the same weighted MSE between the
    frame-to-frame differences of the two along the latent frame axis (dim 2 of (B, C, F, H, W)),
    ``pred[:, :, 1:] - pred[:, :, :-1]`` against the same for the target. It penalises flicker the
    plain MSE does not see: an error that changes from frame to frame. With weight 0, one latent
    frame or no frame axis, it is exactly 0 and not computed.

    loss = mse + temporal; parts = {"mse": float, "temporal": float} (temporal includes its weight).

    ``first_frame_fixed`` (B,) bool: the samples trained as image-to-video, whose first latent frame
    was given clean; their first frame is left out of both terms (there is nothing to learn there).

    ``sample_weights`` (B,): each sample's dataset ``loss_weight``, multiplied into its weight in
    both terms (None: all 1). The mean over the batch still divides by B, so a sample of weight 2
    contributes twice what it would at 1.
    """
    if target is not None and prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if sigmas.ndim != 1 or sigmas.shape[0] != prediction.shape[0]:
        raise ValueError(f"sigmas must have shape ({prediction.shape[0]},) for a batch of {tuple(prediction.shape)}, "
                         f"got {tuple(sigmas.shape)}")
    compared, expected = objective.loss_pair(prediction.float(), None if target is None else target.float(), latents, noisy, sigmas)
    pred, tgt = compared.float(), expected.float()
    weights = objective.weight(sigmas)
    if sample_weights is not None:
        weights = weights.to(pred.device) * sample_weights.to(pred.device, torch.float32)
    reduce_dims = tuple(range(1, pred.ndim))

    if first_frame_fixed is None or pred.ndim != 5:
        mse = _weighted_mean((pred - tgt).pow(2).mean(dim=reduce_dims), weights)
    else:
        frames = torch.ones(pred.shape[0], pred.shape[2], device=pred.device)
        frames[:, 0] = torch.where(first_frame_fixed.to(pred.device, torch.bool), 0.0, 1.0)
        mse = _weighted_mean(_frame_mean((pred - tgt).pow(2), frames), weights)
    loss = mse
    temporal = torch.zeros((), dtype=torch.float32, device=pred.device)
    weight = float(temporal_consistency_weight)
    if weight != 0.0 and pred.ndim == 5 and pred.shape[2] > 1:
        # Differences of the error along time: (d pred - d target) = d (pred - target).
        d_err = ((pred[:, :, 1:] - pred[:, :, :-1]) - (tgt[:, :, 1:] - tgt[:, :, :-1])).pow(2)
        if first_frame_fixed is None:
            per_sample = d_err.mean(dim=reduce_dims)
        else:
            pairs = frames[:, 1:] * frames[:, :-1]  # a pair with a given first frame is not learned
            per_sample = _frame_mean(d_err, pairs)
        temporal = weight * _weighted_mean(per_sample, weights)
        loss = loss + temporal
    parts = {"mse": float(mse.detach()), "temporal": float(temporal.detach())}
    return loss, parts


def flow_matching_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    sigmas: torch.Tensor,
    objective: dict[str, Any],
    temporal_consistency_weight: float = 0.0,
    first_frame_fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``training_loss`` with flow matching weighted as the objective section says (its
    ``loss_weighting``): prediction against ``target`` (noise - latents)."""
    return training_loss(prediction, target, sigmas, _flow_matching(objective), temporal_consistency_weight, first_frame_fixed)


__all__ = [
    "DISTRIBUTIONS",
    "WEIGHTINGS",
    "condition_first_frame",
    "flow_matching_loss",
    "loss_weights",
    "sample_sigmas",
    "training_loss",
    "validation_sigmas",
]
