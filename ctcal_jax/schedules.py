"""Noise schedules and training targets (diffusers `DDPMScheduler`; flow matching for SD3 below).

A schedule is a dict of arrays (a pytree, safe to pass through jit). Axes: B batch, T train steps.
Timesteps are scheduler units: integers 0..T-1 for DDPM, floats in (0, T] for flow matching.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Schedule = dict[str, jax.Array]
PredictionType = Literal["epsilon", "v_prediction", "sample"]


def ddpm_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> Schedule:
    """`betas` and `alphas_cumprod` `[T]` float32, computed as diffusers does (in float32)."""
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported ('scaled_linear', 'linear')")
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    return {"betas": jnp.asarray(betas), "alphas_cumprod": jnp.asarray(alphas_cumprod)}


def ddpm_from_config(config: dict[str, Any]) -> Schedule:
    """A schedule from a diffusers `scheduler_config.json` dict."""
    return ddpm_schedule(
        config.get("num_train_timesteps", 1000),
        config.get("beta_start", 0.00085),
        config.get("beta_end", 0.012),
        config.get("beta_schedule", "scaled_linear"),
    )


def _per_sample(values: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """`values[t]` `[B]` reshaped to broadcast against `like` `[B, ...]`."""
    v = values[jnp.asarray(t, jnp.int32)]
    return v.reshape(v.shape + (1,) * (like.ndim - 1)).astype(like.dtype)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """`x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε` for integer timesteps `t` `[B]`."""
    acp = schedule["alphas_cumprod"]
    return _per_sample(acp**0.5, t, x0) * x0 + _per_sample((1 - acp) ** 0.5, t, x0) * noise


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target `√ᾱ_t · ε − √(1−ᾱ_t) · x0`."""
    acp = schedule["alphas_cumprod"]
    return _per_sample(acp**0.5, t, x0) * noise - _per_sample((1 - acp) ** 0.5, t, x0) * x0


def ddpm_target(
    schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction_type: PredictionType
) -> jax.Array:
    """What the denoiser is trained to predict for `prediction_type`."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={prediction_type!r} is not supported")


def uniform_timesteps(rng: jax.Array, batch: int, num_train_timesteps: int = 1000) -> jax.Array:
    """Training timesteps uniform over the integers [0, T): `[B]` int32."""
    return jax.random.randint(rng, (batch,), 0, num_train_timesteps, dtype=jnp.int32)


# --- Flow matching (SD3 / SD3.5 / FLUX: diffusers `FlowMatchEulerDiscreteScheduler`) -------------
#
# Timesteps are floats in (0, T]; sigma = timestep / T. Schedule index k = 0 is the noisiest
# (timestep T); timesteps decrease with k, as `scheduler.timesteps` does.


def flow_match_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0) -> np.ndarray:
    """The shifted training sigmas `[T]` as a host numpy float32 array (usable while tracing)."""
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    sigmas = t / np.float32(num_train_timesteps)
    return np.float32(shift) * sigmas / (1 + np.float32(shift - 1) * sigmas)


def flow_match_schedule(num_train_timesteps: int = 1000, shift: float = 1.0) -> Schedule:
    """`timesteps` and `sigmas` `[T]` float32: the training schedule diffusers builds in
    `FlowMatchEulerDiscreteScheduler.__init__` (static `shift`, no dynamic shifting)."""
    sigmas = flow_match_sigmas(num_train_timesteps, shift)
    return {"timesteps": jnp.asarray(sigmas * np.float32(num_train_timesteps)), "sigmas": jnp.asarray(sigmas)}


def logit_normal_indices(normal: jax.Array, num_train_timesteps: int, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Schedule indices from standard-normal draws `[B]`: `floor(sigmoid(mean + std·n) · T)`, int32.

    This is diffusers' `compute_density_for_timestep_sampling("logit_normal")` followed by
    `(u * T).long()` (train_dreambooth_lora_sd3.py). u rounds to 1.0 in float32 only for n > ~17;
    such an index is clipped to T − 1 where torch would fail.
    """
    u = jax.nn.sigmoid(mean + std * jnp.asarray(normal, jnp.float32))
    return jnp.minimum((u * num_train_timesteps).astype(jnp.int32), num_train_timesteps - 1)


def sample_flow_timesteps(
    rng: jax.Array, schedule: Schedule, batch: int, mean: float = 0.0, std: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Logit-normal training timesteps and their sigmas, `([B], [B])` float32, looked up by index
    as the SD3 training scripts do (`timesteps[indices]`, `sigmas[indices]`)."""
    idx = logit_normal_indices(jax.random.normal(rng, (batch,)), schedule["timesteps"].shape[0], mean, std)
    return schedule["timesteps"][idx], schedule["sigmas"][idx]


def sample_flow_timesteps_above(
    rng: jax.Array, schedule: Schedule, batch: int, t_min: float
) -> tuple[jax.Array, jax.Array]:
    """Timesteps drawn uniformly from the schedule's points with t ≥ `t_min`, and their sigmas,
    `([B], [B])` float32 (TACA's LoRA, SPEC §4). Raises ValueError when no point reaches `t_min`."""
    allowed = np.flatnonzero(np.asarray(schedule["timesteps"]) >= t_min)
    if allowed.size == 0:
        raise ValueError(f"no schedule timestep is >= {t_min} (max {float(schedule['timesteps'].max()):.1f})")
    idx = jnp.asarray(allowed)[jax.random.randint(rng, (batch,), 0, allowed.size)]
    return schedule["timesteps"][idx], schedule["sigmas"][idx]


def logit_normal_probs(num_train_timesteps: int = 1000, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """`p_k = P(floor(u·T) = k)`, `u = sigmoid(mean + std·n)`, n ~ N(0, 1): `[T]` float64, host-side.

    `p_k = Φ(z_{k+1}) − Φ(z_k)` with `z_k = (logit(k/T) − mean) / std` (z_0 = −∞, z_T = +∞); upper
    tails are differenced as survival functions so small probabilities keep their precision.
    """
    q = np.arange(1, num_train_timesteps) / num_train_timesteps
    z = np.concatenate([[-np.inf], (np.log(q / (1 - q)) - mean) / std, [np.inf]])
    # Φ(z) = erfc(−z/√2)/2 and 1 − Φ(z) = erfc(z/√2)/2, each exact in its own tail.
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    cdf, sf = erfc(-z / math.sqrt(2)) / 2, erfc(z / math.sqrt(2)) / 2
    return np.where(z[:-1] > 0, sf[:-1] - sf[1:], cdf[1:] - cdf[:-1])


def flow_sigmas(timesteps: jax.Array, num_train_timesteps: int = 1000) -> jax.Array:
    """σ = t / T for any flow-matching timestep (the schedule is built so that timesteps = σ·T; on
    schedule points this equals `schedule["sigmas"]` to within a float32 rounding)."""
    return jnp.asarray(timesteps, jnp.float32) / num_train_timesteps


def flow_noisy_input(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """`x_σ = (1 − σ) · x0 + σ · ε` for per-sample sigmas `[B]`."""
    s = jnp.asarray(sigmas, x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise


def flow_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Velocity target `ε − x0`."""
    return noise - x0
