"""Flow-matching schedule, logit-normal timestep sampling and targets against diffusers' scheduler,
its SD3 training utilities and hand-computed values."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from scipy.stats import norm

import jax
import jax.numpy as jnp

from ctcal_jax import schedules

N = 1000


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_matches_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
    ours = schedules.flow_match_schedule(N, shift)
    np.testing.assert_array_equal(np.asarray(ours["timesteps"]), ref.timesteps.numpy())
    np.testing.assert_array_equal(np.asarray(ours["sigmas"]), ref.sigmas.numpy())


def test_schedule_hand_values():
    s = schedules.flow_match_schedule(N, shift=3.0)
    # σ = 3s / (1 + 2s) at s = 1, 0.5, 0.001 (indices 0, 500, 999); t = 1000·σ.
    np.testing.assert_allclose(np.asarray(s["sigmas"])[[0, 500, 999]], [1.0, 0.75, 0.003 / 1.002], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s["timesteps"])[[0, 500, 999]], [1000.0, 750.0, 3.0 / 1.002], rtol=1e-6)
    plain = schedules.flow_match_schedule(N, shift=1.0)
    np.testing.assert_allclose(np.asarray(plain["timesteps"]), np.arange(N, 0, -1), rtol=1e-6)


def test_indices_timesteps_sigmas_match_sd3_script():
    mean, std, batch = 0.3, 1.2, 4096
    u = compute_density_for_timestep_sampling(
        "logit_normal", batch, logit_mean=mean, logit_std=std, generator=torch.Generator().manual_seed(0))
    n = torch.randn(batch, generator=torch.Generator().manual_seed(0))  # the draws behind `u`
    np.testing.assert_allclose(torch.sigmoid(mean + std * n).numpy(), u.numpy(), rtol=1e-6)

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=3.0)
    indices = (u * N).long()  # train_dreambooth_lora_sd3.py
    t_ref = ref.timesteps[indices]
    sigma_ref = torch.stack([ref.sigmas[(ref.timesteps == t).nonzero().item()] for t in t_ref])  # its get_sigmas

    ours = schedules.logit_normal_indices(jnp.asarray(n.numpy()), N, mean, std)
    np.testing.assert_array_equal(np.asarray(ours), indices.numpy())
    s = schedules.flow_match_schedule(N, 3.0)
    np.testing.assert_array_equal(np.asarray(s["timesteps"][ours]), t_ref.numpy())
    np.testing.assert_array_equal(np.asarray(s["sigmas"][ours]), sigma_ref.numpy())
    np.testing.assert_allclose(np.asarray(schedules.flow_sigmas(t_ref.numpy(), N)), sigma_ref.numpy(), rtol=1e-6)


def test_index_clipped_when_u_rounds_to_one():
    assert int(schedules.logit_normal_indices(jnp.asarray([40.0]), N)[0]) == N - 1


def test_probs_hand_values():
    # T = 4: edges logit(1/4) = −ln 3, logit(1/2) = 0, logit(3/4) = ln 3.
    p = schedules.logit_normal_probs(4, mean=0.0, std=1.0)
    a = norm.cdf(-np.log(3))
    np.testing.assert_allclose(p, [a, 0.5 - a, 0.5 - a, a], rtol=1e-12)
    p = schedules.logit_normal_probs(4, mean=0.5, std=2.0)
    z = (np.array([-np.log(3), 0.0, np.log(3)]) - 0.5) / 2.0
    np.testing.assert_allclose(p, np.diff(np.concatenate([[0.0], norm.cdf(z), [1.0]])), rtol=1e-12)
    p = schedules.logit_normal_probs(N, 0.0, 1.0)
    assert p.shape == (N,) and abs(p.sum() - 1) < 1e-12
    # Upper tail keeps relative precision: P(u ≥ 0.999) = 1 − Φ(logit 0.999).
    np.testing.assert_allclose(p[-1], norm.sf(np.log(999)), rtol=1e-9)


def test_probs_match_diffusers_sampler_monte_carlo():
    mean, std, samples = 0.0, 1.0, 2_000_000
    u = compute_density_for_timestep_sampling(
        "logit_normal", samples, logit_mean=mean, logit_std=std, generator=torch.Generator().manual_seed(1))
    counts = np.bincount((u * N).long().numpy(), minlength=N)
    p = schedules.logit_normal_probs(N, mean, std)
    se = np.sqrt(p * (1 - p) / samples)
    assert np.all(np.abs(counts / samples - p) < 6 * se + 1e-7)


def test_sample_flow_timesteps():
    s = schedules.flow_match_schedule(N, 3.0)
    t, sigma = schedules.sample_flow_timesteps(jax.random.key(0), s, 200_000, mean=0.0, std=1.0)
    assert t.shape == sigma.shape == (200_000,) and t.dtype == sigma.dtype == jnp.float32
    idx = np.searchsorted(-np.asarray(s["timesteps"]), -np.asarray(t))
    np.testing.assert_array_equal(np.asarray(s["timesteps"])[idx], np.asarray(t))
    np.testing.assert_array_equal(np.asarray(s["sigmas"])[idx], np.asarray(sigma))
    # Ten bins of 100 indices each against the closed form.
    p = schedules.logit_normal_probs(N).reshape(10, 100).sum(1)
    freq = np.bincount(idx // 100, minlength=10) / idx.size
    np.testing.assert_allclose(freq, p, atol=6 * np.sqrt(p.max() / idx.size))


def test_noisy_input_and_target():
    x0 = jnp.full((2, 1, 1, 1), 2.0)
    eps = jnp.full((2, 1, 1, 1), -1.0)
    out = schedules.flow_noisy_input(x0, eps, jnp.asarray([0.25, 1.0]))
    np.testing.assert_allclose(np.asarray(out).ravel(), [0.75 * 2 - 0.25, -1.0])
    np.testing.assert_allclose(np.asarray(schedules.flow_target(x0, eps)).ravel(), [-3.0, -3.0])

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    eps = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=3.0)
    idx = np.array([0, 307, 999])
    t = ref.timesteps[idx]
    expected = ref.scale_noise(torch.from_numpy(x0), t, torch.from_numpy(eps)).numpy()
    s = schedules.flow_match_schedule(N, 3.0)
    ours = schedules.flow_noisy_input(jnp.asarray(x0), jnp.asarray(eps), s["sigmas"][idx])
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6, atol=1e-6)
