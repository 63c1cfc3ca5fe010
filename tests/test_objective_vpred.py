"""DDPM v-prediction (CogVideoX) against the seed's formulas, computed from the scheduler's own alphas_cumprod.

The seed (../shared/seeds/cogvideo-diffusion-training-loop.txt): t uniform over the schedule;
x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t);
v = alpha_t eps - sigma_t x0; w(t) = 1 / (1 - alpha_bar_t), applied as CogVideo's trainer does, to
the error of the x0 estimate alpha_t x_t - sigma_t v_pred.

References are computed in float64 from the scheduler's own alphas_cumprod (float64 in diffusers'
CogVideoX schedulers); the objective computes in float32, as the scheduler's add_noise and
get_velocity do for float32 latents. The tolerances are bounds of float32 rounding (unit roundoff
U = 2^-24), so they hold on any IEEE machine, not just this one: each float32 operation (sqrt, pow,
multiply, add) is off by at most a few U of its operands' magnitudes, and a sum of N positive terms
by at most N U of its value. One term is large by nature: add_noise rounds alpha_bar to float32
before it takes sqrt(1 - alpha_bar), so near alpha_bar = 1 (the lowest noise level) sigma carries a
relative error of about U alpha_bar / (1 - alpha_bar), some 600 U for CogVideoX-5b at t = 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from core.config import resolve
from core.config.settings import defaults
from core.data.cache import LatentCache, TextCache
from core.data.dataset import CachedSample
from core.errors import ConfigError
from core.models.base import Denoiser
from core.models.objectives import FlowMatching, VPrediction
from core.train.objective import sample_sigmas, training_loss
from core.train.trainer import Trainer
from core.train.validation import Validator

U = 2.0**-24  # float32 unit roundoff
T = 1000

# CogVideoX's scheduler_config.json (THUDM/CogVideoX-2b; the 5b models differ in snr_shift_scale 1.0).
COGVIDEOX_2B = {
    "_class_name": "CogVideoXDDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
COGVIDEOX_5B = {**COGVIDEOX_2B, "snr_shift_scale": 1.0}
SCHEDULES = {"2b": COGVIDEOX_2B, "5b": COGVIDEOX_5B}
# Fixed timesteps from the lowest noise level to the highest (zero terminal SNR: alpha_bar 0).
TIMESTEPS = (0, 1, 10, 250, 500, 750, 998, 999)


def _objective(schedule: str = "2b", weighting: str = "NONE") -> VPrediction:
    return VPrediction(diffusers.CogVideoXDDIMScheduler.from_config(SCHEDULES[schedule]), weighting)


def _levels(timesteps=TIMESTEPS) -> torch.Tensor:
    # The middle of each timestep's bin of s: [t / T, (t + 1) / T) maps to t.
    return (torch.tensor(timesteps, dtype=torch.float64) + 0.5).div(T).float()


def _alpha_bar(objective: VPrediction, timesteps=TIMESTEPS) -> torch.Tensor:
    """The scheduler's own alphas_cumprod at those timesteps, (B, 1, 1, 1, 1) float64."""
    return objective.scheduler.alphas_cumprod[list(timesteps)].double().view(-1, 1, 1, 1, 1)


def _coefficients(objective: VPrediction, timesteps=TIMESTEPS):
    """alpha_t, sigma_t (float64, per sample) and bounds of their error as float32 computes them:
    alpha_bar rounded to float32 (U alpha_bar), 1 - alpha_bar (U, and the rounding of alpha_bar
    relative to 1 - alpha_bar), a square root (U); a factor 2 beyond that for pow's last bit."""
    alpha_bar = _alpha_bar(objective, timesteps)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    d_alpha = alpha * 2 * U
    d_sigma = sigma * (U * alpha_bar / (1 - alpha_bar) + 2 * U)
    return alpha, sigma, d_alpha, d_sigma


def _mix_error(a, x, d_a, b, y, d_b):
    """Error bound of float32 a x + b y for coefficients off by d_a, d_b: theirs, plus the two
    products' and the sum's rounding (a U each of the magnitudes; 2 U for margin)."""
    return x.abs() * d_a + y.abs() * d_b + 2 * U * (a * x.abs() + b * y.abs())


def _data(batch: int = len(TIMESTEPS), shape=(4, 3, 4, 4)):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, *shape, generator=g) for _ in range(3))  # x0, eps, a prediction


def test_the_schedules_are_cogvideoxs():
    # Zero terminal SNR: the highest timestep is pure noise; the SNR shift lowers alpha_bar elsewhere.
    for schedule in SCHEDULES:
        alpha_bar = _objective(schedule).scheduler.alphas_cumprod
        assert alpha_bar.shape == (T,)
        assert float(alpha_bar[-1]) == 0.0 and bool((alpha_bar[1:] < alpha_bar[:-1]).all())
    # CogVideoX-2b's shift 3 puts alpha_bar_0 at 0.99745 (5b, shift 1: 1 - beta_0 = 0.99915).
    assert float(_objective("2b").scheduler.alphas_cumprod[0]) == pytest.approx(0.99745, abs=1e-5)
    assert float(_objective("5b").scheduler.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, abs=1e-6)


def test_noise_levels_map_to_the_schedules_integer_timesteps():
    objective = _objective()
    s = torch.tensor([0.0, 0.0004, 0.001, 0.0015, 0.5, 0.7, 0.9999, 1.0])
    t = objective.timesteps(s)
    assert t.dtype == torch.int64 and t.tolist() == [0, 0, 1, 1, 500, 700, 999, 999]
    # Every timestep owns an equal share of [0, 1): a grid of 7 points per bin lands 7 on each.
    grid = ((torch.arange(T * 7, dtype=torch.float64) + 0.5) / (T * 7)).float()
    assert torch.equal(torch.bincount(objective.timesteps(grid), minlength=T), torch.full((T,), 7))
    # t / T maps back to t for every t: the pipeline's timesteps are on the training grid.
    every = torch.arange(T)
    assert torch.equal(objective.timesteps(every.float() / T), every)


def test_uniform_noise_levels_give_timesteps_uniform_over_the_schedule():
    # As CogVideo's trainer draws them (torch.randint(0, T)): each of the T timesteps equally often.
    n = 200_000
    config = {**defaults()["objective"], "timestep_distribution": "UNIFORM"}
    t = _objective().timesteps(sample_sigmas(n, config, torch.Generator().manual_seed(0)))
    counts = torch.bincount(t, minlength=T).double()
    assert int(t.min()) == 0 and int(t.max()) == T - 1 and counts.shape == (T,)
    expected, spread = n / T, (n / T * (1 - 1 / T)) ** 0.5
    # Binomial counts: 6 standard deviations is beyond any of T = 1000 draws by chance (p < 1e-6).
    assert float((counts - expected).abs().max()) < 6 * spread
    chi2 = float(((counts - expected) ** 2 / expected).sum())  # T - 1 degrees of freedom
    assert abs(chi2 - (T - 1)) < 6 * (2 * (T - 1)) ** 0.5


def test_model_timestep_is_the_integer_timestep_as_the_pipeline_passes_it():
    objective = _objective()
    scheduler = diffusers.CogVideoXDDIMScheduler.from_config(COGVIDEOX_2B)
    scheduler.set_timesteps(50)
    # CogVideoXPipeline gives the transformer t.expand(batch) of these: int64, on the schedule's grid.
    assert objective.model_timestep(_levels()).dtype == scheduler.timesteps.dtype == torch.int64
    assert torch.equal(objective.model_timestep(_levels()), torch.tensor(TIMESTEPS))
    assert torch.equal(objective.model_timestep(scheduler.timesteps.float() / T), scheduler.timesteps)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_noisy_input_and_target_are_the_seeds_formulas(schedule):
    objective = _objective(schedule)
    x0, eps, _ = _data()
    s = _levels()
    alpha, sigma, d_alpha, d_sigma = _coefficients(objective)
    x0_64, eps_64 = x0.double(), eps.double()

    noisy = objective.noisy(x0, eps, s)
    assert noisy.dtype == torch.float32 and noisy.shape == x0.shape
    error = (noisy.double() - (alpha * x0_64 + sigma * eps_64)).abs()
    assert bool((error <= _mix_error(alpha, x0_64, d_alpha, sigma, eps_64, d_sigma)).all())

    target = objective.target(x0, eps, s)
    assert target.dtype == torch.float32
    error = (target.double() - (alpha * eps_64 - sigma * x0_64)).abs()
    assert bool((error <= _mix_error(alpha, eps_64, d_alpha, sigma, x0_64, d_sigma)).all())
    # The highest timestep is pure noise, and its v is -x0.
    assert torch.equal(noisy[-1], eps[-1]) and torch.equal(target[-1], -x0[-1])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_snr_weight_is_one_over_one_minus_alpha_bar(schedule):
    objective = _objective(schedule, "SNR")
    expected = 1.0 / (1.0 - _alpha_bar(objective).flatten())
    weight = objective.weight(_levels())
    assert weight.dtype == torch.float32 and weight.shape == (len(TIMESTEPS),)
    # Computed in the schedule's float64, as CogVideo's trainer does, then rounded to float32 once.
    torch.testing.assert_close(weight.double(), expected, rtol=2 * U, atol=0.0)
    assert float(weight[-1]) == 1.0
    assert torch.equal(_objective(schedule).weight(_levels()), torch.ones(len(TIMESTEPS)))


def _cogvideo_loss(scheduler, prediction, noisy, latent, timesteps):
    """CogVideo's compute_loss (finetune/models/cogvideox_t2v/lora_trainer.py), as it writes it."""
    batch_size = latent.shape[0]
    latent_pred = scheduler.get_velocity(prediction, noisy, timesteps)
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]
    weights = 1 / (1 - alphas_cumprod)
    while len(weights.shape) < len(latent_pred.shape):
        weights = weights.unsqueeze(-1)
    loss = torch.mean((weights * (latent_pred - latent) ** 2).reshape(batch_size, -1), dim=1)
    return loss.mean()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_snr_loss_is_cogvideos_and_equals_the_plain_v_error(schedule):
    objective = _objective(schedule, "SNR")
    x0, eps, prediction = _data()
    s = _levels()
    noisy = objective.noisy(x0, eps, s)
    target = objective.target(x0, eps, s)
    loss, parts = training_loss(prediction, target, s, objective, latents=x0, noisy=noisy)
    n = x0[0].numel()

    # The numbers are CogVideo's: the same x0 estimate (get_velocity(prediction, x_t, t)), the same
    # weight; only the order of one multiply and a mean differs, so they agree to summation rounding.
    cogvideo = _cogvideo_loss(objective.scheduler, prediction, noisy, x0, torch.tensor(TIMESTEPS))
    assert loss.dtype == torch.float32 and parts["temporal"] == 0.0
    assert abs(float(loss) - float(cogvideo)) <= 2 * n * U * float(cogvideo)

    # The identity, in float64: alpha x_t - sigma v_pred - x0 = sigma (v - v_pred), and
    # w sigma^2 = 1, so w |x0 error|^2 = |v error|^2 per sample.
    alpha_bar = _alpha_bar(objective)
    alpha, sigma, w = alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), 1 / (1 - alpha_bar)
    x0_64, eps_64, pred_64 = x0.double(), eps.double(), prediction.double()
    v = alpha * eps_64 - sigma * x0_64
    x0_error = alpha * (alpha * x0_64 + sigma * eps_64) - sigma * pred_64 - x0_64
    per_sample_v = (pred_64 - v).pow(2).flatten(1).mean(1)
    torch.testing.assert_close((w.flatten() * x0_error.pow(2).flatten(1).mean(1)), per_sample_v, rtol=1e-9, atol=0.0)

    # The float32 loss against the plain v error: x_t is off as above, the estimate
    # alpha x_t - sigma v_pred adds its own coefficients' and roundings' error, and subtracting x0
    # a rounding; the squared error moves by 2 |e| d + d^2 for an error d of e, w (float32) by U,
    # and the means add N U of the value.
    _, _, d_alpha, d_sigma = _coefficients(objective)
    d_noisy = _mix_error(alpha, x0_64, d_alpha, sigma, eps_64, d_sigma)
    noisy_64 = noisy.double()
    d = alpha * d_noisy + _mix_error(alpha, noisy_64, d_alpha, sigma, pred_64, d_sigma) + 2 * U * x0_error.abs()
    bound = (w * (2 * x0_error.abs() * d + d * d)).flatten(1).mean(1) + 2 * (n + 1) * U * per_sample_v
    assert abs(float(loss) - float(per_sample_v.mean())) <= float(bound.mean())


def test_the_snr_weight_on_the_v_error_itself_would_be_another_loss():
    # Put on the v error instead of the x0 error, 1 / (1 - alpha_bar_t) weighs the lowest noise
    # level about 400 times (CogVideoX-2b; 5b about 1200 times) over the highest: the two forms
    # agree at t = T - 1, where w = 1, and differ there by w itself.
    for schedule in SCHEDULES:
        # alpha_bar_0 = a / (shift + (1 - shift) a) with a = 1 - beta_start (the rescale keeps it).
        a, shift = 1 - COGVIDEOX_2B["beta_start"], SCHEDULES[schedule]["snr_shift_scale"]
        lowest = 1 / (1 - a / (shift + (1 - shift) * a))
        assert lowest == pytest.approx({"2b": 392.8, "5b": 1176.5}[schedule], abs=0.1)
        objective = _objective(schedule, "SNR")
        w = objective.weight(_levels((0, 999)))
        assert float(w[0]) == pytest.approx(lowest, rel=1e-5) and float(w[1]) == 1.0
        x0, eps, prediction = _data(batch=2)
        s = _levels((0, 999))
        noisy, target = objective.noisy(x0, eps, s), objective.target(x0, eps, s)
        per_sample = [training_loss(prediction[i:i + 1], target[i:i + 1], s[i:i + 1], objective, latents=x0[i:i + 1],
                                    noisy=noisy[i:i + 1])[0] for i in range(2)]
        on_v = [float(w[i]) * float((prediction[i] - target[i]).pow(2).mean()) for i in range(2)]
        assert on_v[1] == pytest.approx(float(per_sample[1]), rel=1e-5)
        assert on_v[0] == pytest.approx(lowest * float(per_sample[0]), rel=1e-3)


def test_none_weights_the_plain_v_error():
    objective = _objective()
    x0, eps, prediction = _data()
    s = _levels()
    target = objective.target(x0, eps, s)
    loss, _ = training_loss(prediction, target, s, objective)
    torch.testing.assert_close(loss, (prediction - target).pow(2).mean())


def test_weightings_are_refused_by_name_for_the_other_objective():
    with pytest.raises(ConfigError, match="objective.loss_weighting SNR is not for flow matching") as info:
        FlowMatching("SNR")
    assert info.value.key == "objective.loss_weighting"
    for weighting in ("SIGMA_SQRT", "COSMAP"):
        with pytest.raises(ConfigError, match=f"{weighting} is not for v-prediction") as info:
            _objective(weighting=weighting)
        assert info.value.key == "objective.loss_weighting"


def test_snr_on_a_flow_matching_model_is_refused_before_any_work(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    wan = tiny_model("wan21")
    config = resolve({
        "base_model": str(wan), "datasets": [{"path": str(tmp_path / "no clips here")}],
        "workspace_dir": str(tmp_path / "ws"), "cache_dir": str(tmp_path / "cache"),
        "output_path": str(tmp_path / "lora.safetensors"), "objective": {"loss_weighting": "SNR"},
    })
    with pytest.raises(ConfigError) as info:
        Trainer(config).run()
    assert info.value.key == "objective.loss_weighting" and "flow matching" in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_from_config_builds_the_named_scheduler_and_refuses_what_is_not_v_prediction():
    objective = VPrediction.from_config(COGVIDEOX_5B, "SNR")
    assert type(objective.scheduler).__name__ == "CogVideoXDDIMScheduler"
    assert objective.num_train_timesteps == T and objective.loss_weighting == "SNR"
    assert torch.equal(objective.scheduler.alphas_cumprod, _objective("5b").scheduler.alphas_cumprod)
    with pytest.raises(ValueError, match="v_prediction"):
        VPrediction.from_config({**COGVIDEOX_2B, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        VPrediction.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "prediction_type": "v_prediction"})


class _PerfectV:
    """An adapter with the v-prediction objective whose model predicts exactly the v its noisy input
    implies, from the clean latents: (alpha_t x_t - x0) / sigma_t = alpha_t eps - sigma_t x0."""

    image_conditioned = False
    kept_text_encoders: tuple[str, ...] = ()  # every condition from the cache

    def __init__(self, objective: VPrediction) -> None:
        self._objective = objective
        self.levels: list[float] = []

    def objective(self, config_objective: dict) -> VPrediction:
        return self._objective

    def split_latents(self, cached: torch.Tensor):
        return cached, None

    def predict(self, model, noisy, sigmas, batch, first_frame_fixed=None, condition=None):
        self.levels.append(float(sigmas[0]))
        alpha_bar = self._objective.alpha_bar(sigmas).double().view(-1, 1, 1, 1, 1)
        x0 = batch["latents"].double()
        return ((alpha_bar.sqrt() * noisy.double() - x0) / (1 - alpha_bar).sqrt()).float()


def test_validation_compares_the_prediction_with_v(tmp_path: Path):
    # Validation stays the plain MSE of the objective's target at fixed quantiles: for v-prediction
    # that target is v, so the exact v scores (float32 rounding of x_t aside) zero.
    key = hashlib.sha256(b"clip").hexdigest()
    text = hashlib.sha256(b"caption").hexdigest()
    LatentCache(tmp_path).put(key, {"latents": torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))})
    mask = torch.zeros(226, dtype=torch.bool)
    mask[:5] = True
    TextCache(tmp_path).put_text(text, torch.randn(226, 32), mask)
    adapter = _PerfectV(_objective("2b", "SNR"))
    config = {"seed": 0, "objective": {**defaults()["objective"], "timestep_distribution": "UNIFORM"}}
    result = Validator(adapter, config, [CachedSample((key,), text)], tmp_path).evaluate(
        [(Denoiser("transformer", "transformer", 0.0, 1.0), torch.nn.Identity())])
    assert adapter.levels == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    assert set(result) == {"val_loss", "val_loss_q10", "val_loss_q30", "val_loss_q50", "val_loss_q70", "val_loss_q90"}
    # x_t is off by a few U of its terms (|x| < 6), which the division by sigma >= 0.3 at most triples.
    assert all(0.0 <= value < (3 * 8 * U * 6) ** 2 for value in result.values()), result


def test_the_snr_loss_needs_no_v_target_and_the_others_ask_for_theirs():
    """The loop computes objective.target only where the loss reads it (needs_target)."""
    x0, eps, prediction = _data()
    s = _levels()
    snr, plain = _objective("2b", "SNR"), _objective("2b", "NONE")
    assert not snr.needs_target and plain.needs_target and FlowMatching().needs_target
    noisy = snr.noisy(x0, eps, s)
    with_target, _ = training_loss(prediction, snr.target(x0, eps, s), s, snr, latents=x0, noisy=noisy)
    without, _ = training_loss(prediction, None, s, snr, latents=x0, noisy=noisy)
    assert torch.equal(with_target, without)
    for objective in (plain, FlowMatching()):
        with pytest.raises(ValueError, match="give the target"):
            training_loss(prediction, None, s, objective, latents=x0, noisy=noisy)


def test_one_steps_timesteps_are_mapped_once_and_new_levels_again():
    objective = _objective("2b", "SNR")
    s = _levels()
    first = objective.timesteps(s)
    assert objective.timesteps(s) is first  # the same noise levels: the same tensor
    other = s.clone()
    assert objective.timesteps(other) is not first and torch.equal(objective.timesteps(other), first)
    assert objective.timesteps(torch.zeros_like(s)).tolist() == [0] * len(s)
