"""DDPM schedule, noising and targets against diffusers' `DDPMScheduler`."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ctcal_jax import schedules


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_schedule_noise_and_velocity_match_diffusers(beta_schedule):
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule, num_train_timesteps=1000)
    ours = schedules.ddpm_from_config(dict(ref.config))
    # float32 linspace/cumprod round differently in numpy and torch: agree to a few ulps.
    np.testing.assert_allclose(ours["betas"], ref.betas.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours["alphas_cumprod"], ref.alphas_cumprod.numpy(), rtol=1e-5)

    rng = np.random.RandomState(0)
    x0 = rng.randn(3, 8, 8, 4).astype(np.float32)
    noise = rng.randn(3, 8, 8, 4).astype(np.float32)
    t = np.array([0, 421, 999])
    to_torch = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))  # noqa: E731
    want = ref.add_noise(to_torch(x0), to_torch(noise), torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(schedules.add_noise(ours, x0, noise, t), want, rtol=1e-5, atol=1e-6)
    want_v = ref.get_velocity(to_torch(x0), to_torch(noise), torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(schedules.velocity(ours, x0, noise, t), want_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(schedules.ddpm_target(ours, x0, noise, t, "v_prediction"), want_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(schedules.ddpm_target(ours, x0, noise, t, "epsilon"), noise)


def test_hand_computed_values_and_errors():
    s = schedules.ddpm_schedule(num_train_timesteps=3, beta_start=0.01, beta_end=0.09, beta_schedule="scaled_linear")
    betas = np.array([0.01, 0.04, 0.09])  # (linspace(0.1, 0.3, 3))²
    np.testing.assert_allclose(s["betas"], betas, rtol=1e-6)
    np.testing.assert_allclose(s["alphas_cumprod"], np.cumprod(1 - betas), rtol=1e-6)
    x0, noise = np.ones((1, 1, 1, 1), np.float32), np.full((1, 1, 1, 1), 2.0, np.float32)
    acp = 0.99 * 0.96
    np.testing.assert_allclose(schedules.add_noise(s, x0, noise, np.array([1])).ravel(),
                               [np.sqrt(acp) + 2 * np.sqrt(1 - acp)], rtol=1e-6)
    with pytest.raises(ValueError, match="beta_schedule"):
        schedules.ddpm_schedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        schedules.ddpm_target(s, x0, noise, np.array([0]), "x0")


def test_uniform_timesteps_cover_the_range():
    import jax

    t = np.asarray(schedules.uniform_timesteps(jax.random.key(0), 20000, 1000))
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999
    assert abs(t.mean() - 499.5) < 10
