"""The flow-matching objective: which noise levels a step trains, what the model sees, and the loss.

Conventions (those of diffusers' FlowMatchEulerDiscreteScheduler and WanPipeline):

- ``sigma`` in [0, 1] is the noise level; for flow matching the training "timestep" as a fraction of
  the range *is* sigma, so ``objective.min_timestep`` / ``max_timestep`` bound sigma directly.
- The noisy input is the straight line ``x_t = (1 - sigma) * latents + sigma * noise``.
- The model predicts the velocity ``d x_t / d sigma = noise - latents`` (the flow target).
- The transformer takes ``timestep = sigma * num_train_timesteps`` (1000) as a float tensor (B,), or,
  for Wan 2.2 TI2V-5B (``expand_timesteps``), one timestep per latent token, (B, seq_len).

Everything the loop calls is a plain function of tensors and the ``objective`` section of a config
(a dict as ``core.config`` resolves it; missing keys take the schema's defaults). Sampling uses only
the caller's ``torch.Generator``, so a seeded run draws the same noise levels every time.

Where diffusers already has the formula (SD3's ``compute_density_for_timestep_sampling`` and
``compute_loss_weighting_for_sd3``) it is used rather than rewritten, so our weighting stays what
diffusers' own training scripts do. ``diffusers.training_utils`` takes seconds to import, so it is
imported on first use, not with this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

DISTRIBUTIONS = ("UNIFORM", "LOGIT_NORMAL", "SIGMOID", "SHIFTED")
WEIGHTINGS = ("NONE", "SIGMA_SQRT", "COSMAP")
NUM_TRAIN_TIMESTEPS = 1000
# The smallest sigma diffusers' flow-matching schedulers ever produce is 1 / num_train_timesteps;
# SD3's training scripts therefore never evaluate SIGMA_SQRT (1 / sigma^2) below it. Our sigmas are
# continuous and may be exactly 0 (UNIFORM with min_timestep 0), where 1 / sigma^2 is infinite, so
# the weighting sees sigma clamped to this floor (a weight of at most 1e6, as in those scripts).
WEIGHTING_SIGMA_FLOOR = 1.0 / NUM_TRAIN_TIMESTEPS


def _training_utils() -> Any:
    # Imported late: diffusers.training_utils pulls in diffusers' models (seconds on a small CPU).
    from diffusers import training_utils

    return training_utils


def _settings(objective: dict[str, Any]) -> dict[str, Any]:
    """The objective section with every key present, checked; missing keys take the schema's defaults."""
    from core.config.settings import lookup, section_defaults

    merged = {**section_defaults(lookup("objective")), **objective}  # type: ignore[arg-type]
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
    # The flow-shift of FlowMatchEulerDiscreteScheduler (and Wan's/SD3's samplers):
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


def loss_weights(sigmas: torch.Tensor, objective: dict[str, Any]) -> torch.Tensor:
    """Per-sample loss weights (B,) float32: NONE -> 1, SIGMA_SQRT -> 1 / sigma^2, COSMAP -> 2 / (pi (1 - 2 sigma + 2 sigma^2)).

    Computed by diffusers' ``compute_loss_weighting_for_sd3``; sigma is floored at
    WEIGHTING_SIGMA_FLOOR first so that SIGMA_SQRT stays finite at sigma = 0.
    """
    settings = _settings(objective)
    scheme = settings["loss_weighting"].lower()  # "none", "sigma_sqrt", "cosmap": diffusers' names
    s = sigmas.detach().float().clamp(min=WEIGHTING_SIGMA_FLOOR)
    return _training_utils().compute_loss_weighting_for_sd3(scheme, sigmas=s).float()


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # (B,) -> (B, 1, 1, ...) so one sigma scales a whole sample of any rank.
    if sigmas.ndim != 1 or sigmas.shape[0] != like.shape[0]:
        raise ValueError(f"sigmas must have shape ({like.shape[0]},) for a batch of {tuple(like.shape)}, got {tuple(sigmas.shape)}")
    return sigmas.float().view(-1, *([1] * (like.ndim - 1)))


def noisy_inputs(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * latents + sigma * noise, float32, shaped like latents (B, C, F, H, W).

    float32 so that mixing bf16 cached latents with noise loses nothing; the caller casts to the
    transformer's dtype when it feeds the model.
    """
    if latents.shape != noise.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _per_sample(sigmas, latents).to(latents.device)
    return (1.0 - s) * latents.float() + s * noise.float()


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns, d x_t / d sigma = noise - latents, float32."""
    return noise.float() - latents.float()


def model_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The transformer's timestep input, sigma * num_train_timesteps as float32 (B,).

    WanPipeline passes the scheduler's ``t`` (= sigma * 1000, a float, not rounded) per sample.
    """
    return sigmas.float() * float(num_train_timesteps)


def expanded_timesteps(
    sigmas: torch.Tensor,
    latent_shape: Sequence[int],
    patch_size: Sequence[int],
    first_frame_fixed: bool | torch.Tensor = False,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """One timestep per latent token, (B, seq_len) float32, for ``expand_timesteps`` models (Wan 2.2 TI2V-5B).

    Built as diffusers' pipelines build it (pipeline_wan.py, text-to-video)::

        mask = torch.ones(latents.shape)                           # (B, C, F, H, W)
        temp_ts = (mask[0][0][:, ::2, ::2] * t).flatten()          # F * H/2 * W/2 tokens
        timestep = temp_ts.unsqueeze(0).expand(latents.shape[0], -1)

    and for image-to-video (pipeline_wan_i2v.py) with ``first_frame_mask`` (ones, first latent
    frame 0) in place of ``mask``: the first frame's tokens are the clean conditioning image and get
    timestep 0. The pipeline's ``::2`` is the transformer's 2x2 spatial patch; here the strides come
    from ``patch_size`` (t, h, w), which gives exactly the pipeline's tensor for Wan's (1, 2, 2).
    Where the pipeline has one ``t`` for the batch, training has one sigma per sample: row b uses
    sigma_b * num_train_timesteps.

    ``latent_shape`` is the latents' shape (B, C, F, H, W) (or any shape ending in F, H, W).
    ``first_frame_fixed`` may also be a (B,) bool tensor: per sample, as training mixes both tasks.
    """
    if len(latent_shape) < 3:
        raise ValueError(f"latent_shape must end in (frames, height, width), got {tuple(latent_shape)}")
    if len(patch_size) != 3:
        raise ValueError(f"patch_size must be (t, h, w), got {tuple(patch_size)}")
    frames, height, width = (int(v) for v in latent_shape[-3:])
    pt, ph, pw = (int(v) for v in patch_size)
    if frames % pt or height % ph or width % pw:
        # The transformer's patch embedding would drop the remainder while the mask slicing keeps it:
        # the token counts would disagree. Buckets are multiples of the patch, so this is a bug upstream.
        raise ValueError(f"latent size (F, H, W) = {(frames, height, width)} is not a multiple of the patch {(pt, ph, pw)}")
    if sigmas.ndim != 1 or (len(latent_shape) == 5 and sigmas.shape[0] != int(latent_shape[0])):
        raise ValueError(f"sigmas must have shape (batch,) for latents {tuple(latent_shape)}, got {tuple(sigmas.shape)}")
    if isinstance(first_frame_fixed, torch.Tensor):
        fixed = first_frame_fixed.to(device=sigmas.device, dtype=torch.bool).reshape(-1, 1, 1, 1)
    else:
        fixed = torch.full((1, 1, 1, 1), bool(first_frame_fixed), device=sigmas.device)
    mask = torch.ones(frames, height, width, dtype=torch.float32, device=sigmas.device)
    # The first latent frame of a conditioned sample is the conditioning image, which is not noised.
    first = torch.arange(frames, device=sigmas.device).reshape(1, frames, 1, 1) == 0
    mask = torch.where(first & fixed, 0.0, mask)  # (1 or B, F, H, W)
    tokens = mask[:, ::pt, ::ph, ::pw].flatten(1)  # (1 or B, seq_len), in the transformer's token order (f, h, w)
    return model_timesteps(sigmas, num_train_timesteps)[:, None] * tokens


def condition_first_frame(noisy: torch.Tensor, latents: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Image-to-video training input: for the samples where ``fixed`` (B,) is True the first latent
    frame is the clean latent (the conditioning image), as WanImageToVideoPipeline feeds Wan 2.2
    TI2V-5B (``latents = (1 - first_frame_mask) * condition + first_frame_mask * latents``)."""
    keep = fixed.to(device=noisy.device, dtype=torch.bool).reshape(-1, 1, 1, 1, 1)
    first = torch.arange(noisy.shape[2], device=noisy.device).reshape(1, 1, -1, 1, 1) == 0
    return torch.where(keep & first, latents.to(noisy.dtype), noisy)


def _frame_mean(values: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of (B, C, F, H, W) values over the frames weighted 1 in ``frames`` (B, F)."""
    per_frame = values.mean(dim=(1, 3, 4))  # (B, F)
    return (per_frame * frames).sum(dim=1) / frames.sum(dim=1).clamp_min(1.0)


def _weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (per_sample * weights.to(per_sample.device)).mean()


def flow_matching_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    sigmas: torch.Tensor,
    objective: dict[str, Any],
    temporal_consistency_weight: float = 0.0,
    first_frame_fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss (a scalar float32 tensor) and its parts for logging.

    mse: per-sample mean squared error over (C, F, H, W), times ``loss_weights(sigmas)``, mean over
    the batch. temporal: ``temporal_consistency_weight`` times the same weighted MSE between the
    frame-to-frame differences of prediction and target along the latent frame axis (dim 2 of
    (B, C, F, H, W)), ``pred[:, :, 1:] - pred[:, :, :-1]`` against the same for the target. It
    penalises flicker the plain MSE does not see: an error that changes from frame to frame. With
    weight 0, one latent frame or no frame axis, it is exactly 0 and not computed.

    loss = mse + temporal; parts = {"mse": float, "temporal": float} (temporal includes its weight).

    ``first_frame_fixed`` (B,) bool: the samples trained as image-to-video, whose first latent frame
    was given clean; their first frame is left out of both terms (there is nothing to learn there).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    pred, tgt = prediction.float(), target.float()
    _per_sample(sigmas, pred)  # shape check
    weights = loss_weights(sigmas, objective)
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


__all__ = [
    "DISTRIBUTIONS",
    "NUM_TRAIN_TIMESTEPS",
    "WEIGHTINGS",
    "WEIGHTING_SIGMA_FLOOR",
    "condition_first_frame",
    "expanded_timesteps",
    "flow_matching_loss",
    "flow_target",
    "loss_weights",
    "model_timesteps",
    "noisy_inputs",
    "sample_sigmas",
    "validation_sigmas",
]
