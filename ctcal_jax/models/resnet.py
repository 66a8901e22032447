"""Convolutional blocks shared by the UNet and the VAE (diffusers `resnet.py`, `downsampling.py`,
`upsampling.py`).

Axes: B batch, H, W spatial, C channels (NHWC). Flax names follow diffusers (`norm1`, `conv1`,
`time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`; `conv` for the resamplers).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ctcal_jax.lora import Dense


def group_norm(groups: int, eps: float, dtype: Any, name: str) -> nn.GroupNorm:
    """GroupNorm with the two-pass variance PyTorch uses (the fast E[x²]−E[x]² form drifts)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, padding: int | None = None) -> nn.Conv:
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, optional timestep shift, 1×1 shortcut when channels change."""

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            t = Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups_out or self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """3×3 stride-2 conv (`padding=0` pads right/bottom by one first, as the VAE does)."""

    out_channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour up-sampling by 2 or to `size`, with PyTorch's `floor(i · in/out)` indexing."""
    h, w = x.shape[1:3]
    out_h, out_w = size or (2 * h, 2 * w)
    if (out_h, out_w) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest ×2 (or to `size`) then a 3×3 conv."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        return conv(self.out_channels, 3, self.dtype, "conv")(upsample_nearest(x, size))
