"""Noise schedules and training targets (diffusers `DDPMScheduler`; flow matching for SD3 below).

A schedule is a dict of arrays (a pytree, safe to pass through jit). Axes: B batch, T train steps.
Timesteps are scheduler units: integers 0..T-1 for DDPM.
"""

from __future__ import annotations

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
