"""The flow-matching objective: timestep sampling, loss weights, noisy inputs, targets and the loss."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
training_utils = pytest.importorskip("diffusers.training_utils")

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numerics import sum_tolerance

from core.config.settings import defaults, lookup
from core.models.objectives import (
    FLOW_MATCHING_WEIGHTINGS,
    expanded_timesteps,
    flow_target,
    model_timesteps,
    noisy_inputs,
)
from core.train.objective import (
    DISTRIBUTIONS,
    WEIGHTINGS,
    flow_matching_loss,
    loss_weights,
    sample_sigmas,
    validation_sigmas,
)

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

torch.set_num_threads(2)


def objective(**changes) -> dict:
    """The schema's default objective section with some settings changed."""
    return {**defaults()["objective"], **changes}


def draw(n: int, seed: int = 0, **changes) -> torch.Tensor:
    return sample_sigmas(n, objective(**changes), torch.Generator().manual_seed(seed))


def test_choices_are_the_schemas():
    # A choice added to the schema must be handled here too.
    assert DISTRIBUTIONS == lookup("objective.timestep_distribution").choices
    assert WEIGHTINGS == lookup("objective.loss_weighting").choices


# -- sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_seeded_generator_reproduces_the_draw(kind):
    a, b = draw(64, seed=7, timestep_distribution=kind), draw(64, seed=7, timestep_distribution=kind)
    assert a.shape == (64,) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(64, seed=8, timestep_distribution=kind))


def test_device_argument_does_not_change_the_draw():
    gen = torch.Generator().manual_seed(3)
    on = sample_sigmas(8, objective(), gen, device="cpu")
    assert on.device.type == "cpu"
    assert torch.equal(on, draw(8, seed=3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(DISTRIBUTIONS),
    ends=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted),
    shift=st.floats(0.1, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_distribution_stays_within_the_range(kind, ends, shift, seed):
    lo, hi = ends
    # The settings require min < max; a range narrower than float32's resolution holds no float32.
    assume(hi - lo > 1e-6)
    sig = draw(
        256,
        seed=seed,
        timestep_distribution=kind,
        min_timestep=lo,
        max_timestep=hi,
        timestep_shift=shift,
        logit_mean=3.0,  # pushes LOGIT_NORMAL against the upper end
        logit_std=4.0,
        sigmoid_scale=5.0,
    )
    assert torch.isfinite(sig).all()
    assert float(sig.min()) >= lo and float(sig.max()) <= hi
    val = validation_sigmas(
        objective(timestep_distribution=kind, min_timestep=lo, max_timestep=hi, timestep_shift=shift),
        quantiles=(0.0, 0.1, 0.5, 0.9, 1.0),
    )
    assert float(val.min()) >= lo and float(val.max()) <= hi


def test_range_is_a_linear_map_of_the_unrestricted_draw():
    full = draw(100, seed=1, timestep_distribution="SHIFTED")
    narrow = draw(100, seed=1, timestep_distribution="SHIFTED", min_timestep=0.2, max_timestep=0.6)
    torch.testing.assert_close(narrow, 0.2 + full * 0.4)


def test_shifted_has_a_higher_median_than_sigmoid():
    sigmoid = draw(4000, timestep_distribution="SIGMOID")
    shifted = draw(4000, timestep_distribution="SHIFTED", timestep_shift=3.0)
    assert abs(float(sigmoid.median()) - 0.5) < 0.03
    # The shift of the median 0.5 is 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert abs(float(shifted.median()) - 0.75) < 0.03
    # Same seed: each shifted draw is the shift of the sigmoid draw, so it is never lower.
    assert (shifted >= sigmoid).all()


def test_logit_normal_mean_moves_with_logit_mean():
    means = [float(draw(4000, timestep_distribution="LOGIT_NORMAL", logit_mean=m).mean()) for m in (-1.0, 0.0, 1.0)]
    assert means[0] < means[1] < means[2]
    assert abs(means[1] - 0.5) < 0.02


def test_sigmoid_scale_spreads_the_draw():
    narrow = draw(4000, timestep_distribution="SIGMOID", sigmoid_scale=0.3)
    wide = draw(4000, timestep_distribution="SIGMOID", sigmoid_scale=3.0)
    assert float(narrow.std()) < float(wide.std())


def test_uniform_is_flat():
    n = 20_000
    sig = draw(n, seed=123, timestep_distribution="UNIFORM").sort().values.double()
    # Kolmogorov-Smirnov distance to U(0, 1); the 1% critical value is 1.63 / sqrt(n).
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((grid - sig).abs(), (sig - (grid - 1 / n)).abs()).max())
    assert ks < 1.63 / math.sqrt(n)
    counts = torch.histc(sig, bins=10, min=0.0, max=1.0)
    assert float((counts / (n / 10) - 1).abs().max()) < 0.06


def test_unknown_choices_are_refused():
    with pytest.raises(ValueError, match="timestep_distribution"):
        draw(2, timestep_distribution="GAUSSIAN")
    with pytest.raises(ValueError, match="loss_weighting"):
        loss_weights(torch.ones(2), objective(loss_weighting="SNR"))
    with pytest.raises(ValueError, match="min_timestep"):
        draw(2, min_timestep=0.8, max_timestep=0.2)


# -- validation sigmas -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_validation_sigmas_increase_within_the_range(kind):
    val = validation_sigmas(objective(timestep_distribution=kind, min_timestep=0.1, max_timestep=0.9))
    assert val.shape == (5,) and val.dtype == torch.float32
    assert (val[1:] > val[:-1]).all()
    assert float(val.min()) >= 0.1 and float(val.max()) <= 0.9


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_validation_sigmas_are_the_quantiles_of_the_draw(kind):
    obj = objective(timestep_distribution=kind, logit_mean=0.5, min_timestep=0.05, max_timestep=0.95)
    quantiles = (0.1, 0.3, 0.5, 0.7, 0.9)
    empirical = torch.quantile(sample_sigmas(20_000, obj, torch.Generator().manual_seed(5)), torch.tensor(quantiles))
    torch.testing.assert_close(validation_sigmas(obj, quantiles), empirical, atol=0.015, rtol=0)


def test_validation_sigmas_of_uniform_are_the_quantiles():
    torch.testing.assert_close(validation_sigmas(objective(timestep_distribution="UNIFORM")), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))


# -- loss weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", FLOW_MATCHING_WEIGHTINGS)
def test_loss_weights_are_diffusers_sd3_weights(weighting):
    sigmas = torch.linspace(0.01, 1.0, 50)
    got = loss_weights(sigmas, objective(loss_weighting=weighting))
    expected = training_utils.compute_loss_weighting_for_sd3(weighting.lower(), sigmas=sigmas)
    assert got.shape == (50,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float())
    if weighting == "NONE":
        assert torch.equal(got, torch.ones(50))


def test_sigma_sqrt_is_finite_at_sigma_zero():
    w = loss_weights(torch.tensor([0.0, 1.0]), objective(loss_weighting="SIGMA_SQRT"))
    assert torch.isfinite(w).all() and float(w[0]) == pytest.approx(1e6)


# -- noisy inputs, target, timesteps -----------------------------------------------------------------


def _latents_and_noise(shape=(2, 4, 3, 4, 6)):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_noisy_input_ends_and_derivative():
    latents, noise = _latents_and_noise()
    torch.testing.assert_close(noisy_inputs(latents, noise, torch.zeros(2)), latents)
    torch.testing.assert_close(noisy_inputs(latents, noise, torch.ones(2)), noise)
    # Per-sample sigma: row 0 clean, row 1 pure noise.
    mixed = noisy_inputs(latents, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(mixed[0], latents[0])
    torch.testing.assert_close(mixed[1], noise[1])
    # d x_t / d sigma is the flow target.
    sigmas = torch.tensor([0.3, 0.7], requires_grad=True)
    x_t = noisy_inputs(latents, noise, sigmas)
    direction = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((x_t * direction).sum(), sigmas)
    target = flow_target(latents, noise)
    # autograd sums noise * direction and latents * direction apart, the formula their difference:
    # the same value, summed in other orders (which the CPU's kernels choose).
    terms = torch.cat([noise * direction, latents * direction], dim=1)
    tolerance = sum_tolerance(terms, dim=(1, 2, 3, 4))
    assert ((grad - (target * direction).sum(dim=(1, 2, 3, 4))).abs() <= tolerance).all(), tolerance
    torch.testing.assert_close(target, noise - latents)


def test_noisy_input_is_float32_for_half_latents():
    latents, noise = _latents_and_noise()
    out = noisy_inputs(latents.bfloat16(), noise.bfloat16(), torch.full((2,), 0.5))
    assert out.dtype == torch.float32


def test_model_timesteps_scale_by_1000():
    torch.testing.assert_close(model_timesteps(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([0.0, 250.0, 1000.0]))
    assert model_timesteps(torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float32


def _pipeline_timestep(t: torch.Tensor, latents_shape: tuple[int, ...], image_to_video: bool) -> torch.Tensor:
    """What diffusers 0.42's pipelines pass as `timestep` when `expand_timesteps` is set, copied from them.

    pipeline_wan.py, WanPipeline.__call__ (text-to-video):
        mask = torch.ones(latents.shape, dtype=torch.float32, device=device)
        ...
        if self.config.expand_timesteps:
            temp_ts = (mask[0][0][:, ::2, ::2] * t).flatten()
            timestep = temp_ts.unsqueeze(0).expand(latents.shape[0], -1)
    pipeline_wan_i2v.py, prepare_latents and __call__ (image-to-video):
        first_frame_mask = torch.ones(1, 1, num_latent_frames, latent_height, latent_width, ...)
        first_frame_mask[:, :, 0] = 0
        ...
            temp_ts = (first_frame_mask[0][0][:, ::2, ::2] * t).flatten()
            timestep = temp_ts.unsqueeze(0).expand(latents.shape[0], -1)
    """
    b, _, f, h, w = latents_shape
    if image_to_video:
        mask = torch.ones(1, 1, f, h, w, dtype=torch.float32)
        mask[:, :, 0] = 0
    else:
        mask = torch.ones(latents_shape, dtype=torch.float32)
    temp_ts = (mask[0][0][:, ::2, ::2] * t).flatten()
    return temp_ts.unsqueeze(0).expand(b, -1)


@pytest.mark.parametrize("image_to_video", [False, True])
def test_expanded_timesteps_match_the_pipeline(image_to_video):
    shape = (3, 48, 3, 4, 6)  # Wan 2.2 TI2V-5B latents: 48 channels, 2x2 patches -> 3 * 2 * 3 = 18 tokens
    sigmas = torch.tensor([0.9, 0.9, 0.9])  # the pipeline has one t for the whole batch
    got = expanded_timesteps(sigmas, shape, (1, 2, 2), first_frame_fixed=image_to_video)
    expected = _pipeline_timestep(torch.tensor(900.0), shape, image_to_video)
    assert got.shape == (3, 18) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    if image_to_video:
        assert torch.equal(got[:, :6], torch.zeros(3, 6))  # the first latent frame's 2 * 3 tokens
        assert (got[:, 6:] == 900.0).all()


def test_expanded_timesteps_take_each_samples_sigma():
    shape = (2, 48, 2, 4, 4)
    sigmas = torch.tensor([0.2, 0.6])
    got = expanded_timesteps(sigmas, shape, (1, 2, 2))
    for b in range(2):
        torch.testing.assert_close(got[b], _pipeline_timestep(model_timesteps(sigmas[b : b + 1])[0], shape, False)[0])


def test_expanded_timesteps_refuse_sizes_off_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of the patch"):
        expanded_timesteps(torch.ones(1), (1, 48, 2, 5, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="sigmas"):
        expanded_timesteps(torch.ones(2), (1, 48, 2, 4, 4), (1, 2, 2))


def test_expanded_timesteps_in_the_real_pipeline(tmp_path):
    """The tiny Wan 2.2 TI2V-5B pipeline, run for one step, passes the transformer what we build."""
    import diffusers

    from core.models.tiny import build_tiny_model

    pipe = diffusers.WanPipeline.from_pretrained(build_tiny_model("wan22_ti2v_5b", tmp_path / "tiny"))
    pipe.set_progress_bar_config(disable=True)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module, args, kwargs):
        seen.append((kwargs["timestep"].clone(), kwargs["hidden_states"].shape))

    pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    pipe("a red square", height=64, width=64, num_frames=5, num_inference_steps=1, guidance_scale=1.0,
         output_type="latent", generator=torch.Generator().manual_seed(0))
    timestep, latent_shape = seen[0]
    sigma = pipe.scheduler.timesteps[0] / pipe.scheduler.config.num_train_timesteps
    got = expanded_timesteps(sigma.reshape(1).float(), tuple(latent_shape), tuple(pipe.transformer.config.patch_size))
    assert got.shape == timestep.shape
    torch.testing.assert_close(got, timestep.float())


# -- loss --------------------------------------------------------------------------------------------


def _prediction_and_target(frames: int = 4):
    gen = torch.Generator().manual_seed(2)
    shape = (2, 4, frames, 4, 4)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


@pytest.mark.parametrize("weighting", FLOW_MATCHING_WEIGHTINGS)
def test_mse_is_the_weighted_per_sample_mean(weighting):
    pred, target = _prediction_and_target()
    sigmas = torch.tensor([0.3, 0.8])
    obj = objective(loss_weighting=weighting)
    loss, parts = flow_matching_loss(pred, target, sigmas, obj, 0.0)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3, 4))
    expected = (per_sample * training_utils.compute_loss_weighting_for_sd3(weighting.lower(), sigmas=sigmas)).mean()
    assert loss.ndim == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    assert parts == {"mse": pytest.approx(float(expected)), "temporal": 0.0}


def test_temporal_loss_definition():
    pred, target = _prediction_and_target()
    sigmas = torch.tensor([0.3, 0.8])
    obj = objective(loss_weighting="COSMAP")
    loss, parts = flow_matching_loss(pred, target, sigmas, obj, 0.5)
    d_pred, d_target = pred[:, :, 1:] - pred[:, :, :-1], target[:, :, 1:] - target[:, :, :-1]
    weights = loss_weights(sigmas, obj)
    temporal = 0.5 * (((d_pred - d_target) ** 2).mean(dim=(1, 2, 3, 4)) * weights).mean()
    assert parts["temporal"] == pytest.approx(float(temporal)) and parts["temporal"] > 0
    torch.testing.assert_close(loss, torch.tensor(parts["mse"]) + temporal)


def test_temporal_loss_is_zero_when_off_or_nothing_to_compare():
    pred, target = _prediction_and_target()
    sigmas = torch.tensor([0.3, 0.8])
    assert flow_matching_loss(pred, target, sigmas, objective(), 0.0)[1]["temporal"] == 0.0
    loss, parts = flow_matching_loss(target.clone(), target, sigmas, objective(), 1.0)
    assert parts == {"mse": 0.0, "temporal": 0.0} and float(loss) == 0.0
    single_pred, single_target = _prediction_and_target(frames=1)
    loss, parts = flow_matching_loss(single_pred, single_target, sigmas, objective(), 1.0)
    assert parts["temporal"] == 0.0 and torch.isfinite(loss)
    assert float(loss) == pytest.approx(parts["mse"])


def test_temporal_loss_changes_the_gradient():
    pred, target = _prediction_and_target()
    sigmas = torch.tensor([0.3, 0.8])
    grads = []
    for weight in (0.0, 1.0):
        p = pred.clone().requires_grad_(True)
        loss, _ = flow_matching_loss(p, target, sigmas, objective(), weight)
        loss.backward()
        grads.append(p.grad)
    assert torch.isfinite(grads[1]).all()
    assert not torch.allclose(grads[0], grads[1])
    # With weight 0 the gradient is the plain MSE's, 2 (pred - target) / N per sample, over B.
    n = pred[0].numel()
    torch.testing.assert_close(grads[0], 2 * (pred - target) / n / 2)


def test_loss_shapes_are_checked():
    pred, target = _prediction_and_target()
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(pred, target[:, :, :2], torch.ones(2), objective(), 0.0)
    with pytest.raises(ValueError, match="sigmas"):
        flow_matching_loss(pred, target, torch.ones(3), objective(), 0.0)
