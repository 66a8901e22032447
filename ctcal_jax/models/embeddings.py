"""Timestep embeddings shared by the denoisers (diffusers `Timesteps` + `TimestepEmbedding`).

Axes: B batch, C embedding channels.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ctcal_jax.lora import Dense


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps `[B]` -> `[B, dim]` float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def batch_timesteps(timesteps: jax.Array | float, batch: int) -> jax.Array:
    """A scalar or `[B]` timestep argument as a `[B]` float32 array."""
    t = jnp.asarray(timesteps, jnp.float32)
    return jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))


class TimestepEmbedding(nn.Module):
    """`linear_1` -> SiLU -> `linear_2`."""

    dim: int
    out_dim: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return Dense(self.out_dim or self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))
