"""What a model family learns: its objective, over the one noise-level axis training shares.

The axis is ``s`` in [0, 1]: 0 is the clean latents, 1 the most noise the model is trained at. The
timestep distributions draw it (core/train/objective.py), ``objective.min_timestep`` /
``max_timestep`` bound it, a two-expert model splits it (Wan 2.2 A14B's boundary, ``Denoiser``'s
ranges) and validation fixes it at quantiles. An objective says what a noise level means for its
model, as functions of s:

- ``noisy(x0, noise, s)``: the denoiser's input;
- ``target(x0, noise, s)``: what the denoiser learns to predict;
- ``weight(s)``: the per-sample loss weight ``objective.loss_weighting`` asks for, (B,) float32;
- ``model_timestep(s)``: the transformer's timestep input, (B,);
- ``loss_pair(prediction, target, x0, noisy, s)``: the two tensors whose squared difference
  ``weight(s)`` multiplies. That is (prediction, target) unless a weighting is defined on another
  quantity (SNR: the x0 estimate, as CogVideo's trainer computes it); ``needs_target`` says whether
  the loss reads the target at all, so a step does not compute one it drops.

Two implementations. ``FlowMatching`` (Wan, and the later flow families): s is the flow sigma
itself. ``VPrediction`` (CogVideoX): DDPM's v-prediction over a diffusers scheduler's
``alphas_cumprod``, s mapped to its integer timesteps. The adapter says which one its model has
(``ModelAdapter.objective``); the loop and validation only ever ask that object, and the draws and
experts need only the axis.

All inputs and targets are float32 whatever the latents' dtype: mixing bf16 cached latents with
noise in bf16 would lose the low bits the loss compares. torch is imported with this module, which
only training and the forward call import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
FLOW_MATCHING_WEIGHTINGS = ("NONE", "SIGMA_SQRT", "COSMAP")
V_PREDICTION_WEIGHTINGS = ("NONE", "SNR")
# Every objective.loss_weighting value, in the schema's order (tests/test_objective.py checks it).
WEIGHTINGS = ("NONE", "SIGMA_SQRT", "COSMAP", "SNR")
# The smallest sigma diffusers' flow-matching schedulers ever produce is 1 / num_train_timesteps;
# SD3's training scripts therefore never evaluate SIGMA_SQRT (1 / sigma^2) below it. Our sigmas are
# continuous and may be exactly 0 (UNIFORM with min_timestep 0), where 1 / sigma^2 is infinite, so
# the weighting sees sigma clamped to this floor (a weight of at most 1e6, as in those scripts).
WEIGHTING_SIGMA_FLOOR = 1.0 / NUM_TRAIN_TIMESTEPS


def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # (B,) -> (B, 1, 1, ...) so one noise level scales a whole sample of any rank.
    if s.ndim != 1 or s.shape[0] != like.shape[0]:
        raise ValueError(f"sigmas must have shape ({like.shape[0]},) for a batch of {tuple(like.shape)}, got {tuple(s.shape)}")
    return s.float().view(-1, *([1] * (like.ndim - 1)))


def _same_shape(x0: torch.Tensor, noise: torch.Tensor) -> None:
    if x0.shape != noise.shape:
        raise ValueError(f"latents {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")


# -- flow matching's formulas (diffusers' FlowMatchEulerDiscreteScheduler and WanPipeline) ----------


def noisy_inputs(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * latents + sigma * noise, float32, shaped like latents (B, C, F, H, W).

    float32 so that mixing bf16 cached latents with noise loses nothing; the caller casts to the
    transformer's dtype when it feeds the model.
    """
    _same_shape(latents, noise)
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


def configured_weighting(config_objective: Mapping[str, Any]) -> str:
    """objective.loss_weighting of a config's objective section; the schema's default where absent
    (a partial section, as tests and older callers pass)."""
    if "loss_weighting" in config_objective:
        return str(config_objective["loss_weighting"])
    from core.config.settings import lookup

    return str(lookup("objective.loss_weighting").default)  # type: ignore[union-attr]


# -- the interface ---------------------------------------------------------------------------------


class Objective(ABC):
    """A family's objective over the noise-level axis s in [0, 1]; see the module docstring."""

    name: str  # what messages call it: "flow matching", "v-prediction"
    weightings: tuple[str, ...]  # the objective.loss_weighting values it has a formula for

    def __init__(self, loss_weighting: str = "NONE") -> None:
        if loss_weighting not in self.weightings:
            # Refused by name, before any work: a weighting defined for another objective would
            # otherwise weigh this one's losses by a formula that means nothing for it.
            raise ConfigError(
                f"objective.loss_weighting {loss_weighting} is not for {self.name}, which this model trains "
                f"with; use one of {', '.join(self.weightings)}",
                key="objective.loss_weighting",
            )
        self.loss_weighting = loss_weighting

    @abstractmethod
    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The denoiser's input at noise levels s (B,), float32, shaped like x0."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to predict at noise levels s, float32, shaped like x0."""

    @abstractmethod
    def weight(self, s: torch.Tensor) -> torch.Tensor:
        """The per-sample loss weight of objective.loss_weighting, (B,) float32."""

    @abstractmethod
    def model_timestep(self, s: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input for noise levels s, (B,)."""

    @property
    def needs_target(self) -> bool:
        """Whether loss_pair compares the prediction with target(); False: it may be given None."""
        return True

    def loss_pair(self, prediction: torch.Tensor, target: torch.Tensor | None, x0: torch.Tensor | None,
                  noisy: torch.Tensor | None, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two tensors whose squared difference weight(s) multiplies in the training loss."""
        if target is None:
            raise ValueError(f"the {self.name} loss compares the prediction with its target: give the target")
        return prediction, target


class FlowMatching(Objective):
    """Flow matching, as diffusers' FlowMatchEulerDiscreteScheduler and WanPipeline define it: s is the
    flow sigma; x_t = (1 - s) x0 + s noise; target noise - x0; timestep s * 1000 (a float).

    Weightings: NONE, SIGMA_SQRT (1 / sigma^2, sigma floored at WEIGHTING_SIGMA_FLOOR) and COSMAP,
    computed by diffusers' ``compute_loss_weighting_for_sd3`` (SD3's), so they stay what diffusers'
    own training scripts do.
    """

    name = "flow matching"
    weightings = FLOW_MATCHING_WEIGHTINGS

    def __init__(self, loss_weighting: str = "NONE", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        super().__init__(loss_weighting)
        self.num_train_timesteps = int(num_train_timesteps)
        # Imported here, once per run: diffusers.training_utils pulls in diffusers' models (seconds
        # on a small CPU), and the step must not pay for an import.
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        self._sd3_weighting = compute_loss_weighting_for_sd3
        self._scheme = loss_weighting.lower()  # "none", "sigma_sqrt", "cosmap": diffusers' names

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return noisy_inputs(x0, noise, s)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return flow_target(x0, noise)

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        floored = s.detach().float().clamp(min=WEIGHTING_SIGMA_FLOOR)
        return self._sd3_weighting(self._scheme, sigmas=floored).float()

    def model_timestep(self, s: torch.Tensor) -> torch.Tensor:
        return model_timesteps(s, self.num_train_timesteps)


# Schedulers with the DDPM forward process (alphas_cumprod, add_noise, get_velocity) that a
# v-prediction model's folder may name: CogVideoX ships CogVideoXDDIMScheduler, CogVideo's own
# trainer loads CogVideoXDPMScheduler; their alphas_cumprod are built the same way.
V_PREDICTION_SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler", "DDIMScheduler", "DDPMScheduler")


class VPrediction(Objective):
    """DDPM v-prediction (CogVideoX) over a diffusers scheduler's ``alphas_cumprod`` (alpha_bar).

    s maps to the discrete timestep t = min(floor(s * T), T - 1), T = num_train_timesteps (see
    ``timesteps``), so a UNIFORM s gives t uniform over the schedule's integer timesteps, as
    CogVideo's training code draws them (torch.randint(0, T)). With alpha_t = sqrt(alpha_bar_t)
    and sigma_t = sqrt(1 - alpha_bar_t):

    - noisy: x_t = alpha_t x0 + sigma_t noise (the scheduler's ``add_noise``);
    - target: v = alpha_t noise - sigma_t x0 (its ``get_velocity``);
    - model timestep: t, an int64 tensor, as CogVideoXPipeline passes it;
    - NONE: weight 1 on the squared v error;
    - SNR: w(t) = 1 / (1 - alpha_bar_t) on the squared error of the x0 estimate made from the
      prediction, x0_pred = alpha_t x_t - sigma_t v_pred, against x0: CogVideo's trainer
      (finetune/models/cogvideox_t2v/lora_trainer.py) computes x0_pred as
      ``scheduler.get_velocity(prediction, x_t, t)``, and so does ``loss_pair`` here. Since
      x0_pred - x0 = sigma_t (v - v_pred) and sigma_t^2 = 1 - alpha_bar_t, that loss equals the plain
      squared v error; the same w put on the v error itself would weigh the lowest noise level
      about 390 times over the highest (CogVideoX-2b's schedule; 1180 times with the 5b's).

    The scheduler is used for its formulas only; ``add_noise`` moves its ``alphas_cumprod`` to the
    latents' device, so give this objective a scheduler of its own (``from_config`` builds one).
    """

    name = "v-prediction"
    weightings = V_PREDICTION_WEIGHTINGS

    def __init__(self, scheduler: Any, loss_weighting: str = "NONE") -> None:
        super().__init__(loss_weighting)
        prediction_type = getattr(scheduler.config, "prediction_type", None)
        if prediction_type != "v_prediction":
            raise ValueError(f"{type(scheduler).__name__} predicts {prediction_type!r}, not 'v_prediction'")
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        # The last (s, t): a step maps the same noise levels for its input, weight, loss and the
        # transformer's timestep; s is held, so its identity cannot pass to another tensor.
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any], loss_weighting: str = "NONE") -> VPrediction:
        """From a scheduler_config.json's content, with the scheduler class it names (a DDPM-family
        scheduler from V_PREDICTION_SCHEDULERS; CogVideoXDDIMScheduler when it names none)."""
        import diffusers

        name = str(scheduler_config.get("_class_name") or "CogVideoXDDIMScheduler")
        if name not in V_PREDICTION_SCHEDULERS:
            raise ValueError(f"scheduler {name} has no DDPM forward process; expected one of "
                             f"{', '.join(V_PREDICTION_SCHEDULERS)}")
        return cls(getattr(diffusers, name).from_config(dict(scheduler_config)), loss_weighting)

    def timesteps(self, s: torch.Tensor) -> torch.Tensor:
        """t = min(floor(s * T), T - 1), int64 (B,), for s as float32 stores it.

        float32 holds a bin edge k / T up to a rounding step below it (0.7 is 0.69999999, 0.251 is
        0.25099999), where floor would give k - 1; so a level within float32's rounding (2^-24) of
        an edge counts as on it. Then every t / T maps back to t (a quantile of 0.7 trains t 700),
        and the bins keep their width 1 / T but for that 2^-24 at the ends.
        """
        if self._last is not None and self._last[0] is s:
            return self._last[1]
        total = self.num_train_timesteps
        t = torch.floor(s.detach().double() * total + total * 2.0**-24).long().clamp(0, total - 1)
        self._last = (s, t)
        return t

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        _same_shape(x0, noise)
        _per_sample(s, x0)  # shape check
        return self.scheduler.add_noise(x0.float(), noise.float(), self.timesteps(s).to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        _same_shape(x0, noise)
        _per_sample(s, x0)
        return self.scheduler.get_velocity(x0.float(), noise.float(), self.timesteps(s).to(x0.device))

    def alpha_bar(self, s: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t (the scheduler's alphas_cumprod, in its dtype) at each sample's timestep, (B,)."""
        t = self.timesteps(s)
        return self.scheduler.alphas_cumprod.to(device=t.device)[t]

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        if self.loss_weighting == "SNR":
            # As CogVideo's trainer: 1 / (1 - alphas_cumprod[t]) in the schedule's own precision
            # (float64 in diffusers' CogVideoX schedulers), rounded to float32 once.
            return (1.0 / (1.0 - self.alpha_bar(s))).float()
        return torch.ones(s.shape, dtype=torch.float32, device=s.device)

    def model_timestep(self, s: torch.Tensor) -> torch.Tensor:
        return self.timesteps(s)

    @property
    def needs_target(self) -> bool:
        return self.loss_weighting != "SNR"  # SNR compares x0 estimates, not v

    def loss_pair(self, prediction: torch.Tensor, target: torch.Tensor | None, x0: torch.Tensor | None,
                  noisy: torch.Tensor | None, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loss_weighting != "SNR":
            return super().loss_pair(prediction, target, x0, noisy, s)
        if x0 is None or noisy is None:
            raise ValueError("the SNR weighting compares x0 estimates: give the clean latents and the noisy input")
        # get_velocity(sample, noise, t) = alpha_t noise - sigma_t sample; with the prediction as
        # sample and x_t as noise it is alpha_t x_t - sigma_t v_pred, the x0 estimate, exactly as
        # CogVideo's trainer writes it.
        estimate = self.scheduler.get_velocity(prediction.float(), noisy.float(), self.timesteps(s).to(prediction.device))
        return estimate, x0.float()


__all__ = [
    "FLOW_MATCHING_WEIGHTINGS",
    "NUM_TRAIN_TIMESTEPS",
    "V_PREDICTION_SCHEDULERS",
    "V_PREDICTION_WEIGHTINGS",
    "WEIGHTINGS",
    "WEIGHTING_SIGMA_FLOOR",
    "FlowMatching",
    "Objective",
    "VPrediction",
    "configured_weighting",
    "expanded_timesteps",
    "flow_target",
    "model_timesteps",
    "noisy_inputs",
]
