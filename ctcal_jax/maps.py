"""Attention-map processing shared by CTCAL (training) and IterRef (inference), SPEC §2.

Axes: B batch, H, W map side, T text tokens of one stream, N word groups (nouns or subjects; padded
rows are all zero). Maps are channels-last `[B, H, W, T]` or `[B, H, W, N]`, as the denoisers
return `aux["attn"]`.

- `gaussian_smooth`: Attend-and-Excite's Gaussian (reflect padding, "same" size).
- `reweight`: `softmax(scale · A)` over the prompt's real tokens (A&E / InitNO, scale 100).
- `group_mean`: the sub-token mean of each word, from `[B, N, T]` weights (`nouns.group_weights`).
- `minmax_normalize`: per-map min-max over space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_kernel_1d(kernel_size: int = 3, sigma: float = 0.5) -> np.ndarray:
    """Attend-and-Excite weights `w(x) ∝ exp(-((x − μ)/(2σ))²)`, μ the centre, normalised: `[k]` float32."""
    x = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
    w = np.exp(-((x / (2 * sigma)) ** 2))
    return (w / w.sum()).astype(np.float32)


def gaussian_smooth(maps: jax.Array, kernel_size: int = 3, sigma: float = 0.5) -> jax.Array:
    """`[B, H, W, T]` -> `[B, H, W, T]`: 2-D Gaussian (outer product of the 1-D weights), reflect
    padding, "same" size. Applied as two 1-D passes, which is exact for an outer-product kernel
    with per-axis reflection."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size={kernel_size} must be odd for a 'same' smoothing")
    w = gaussian_kernel_1d(kernel_size, sigma)
    pad = kernel_size // 2
    for axis in (1, 2):
        widths = [(0, 0)] * maps.ndim
        widths[axis] = (pad, pad)
        padded = jnp.pad(maps, widths, mode="reflect")
        n = maps.shape[axis]
        maps = sum(float(w[i]) * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(kernel_size))
    return maps


def safe_div(num: jax.Array, den: jax.Array, ok: jax.Array) -> jax.Array:
    """`num / den` where `ok`, else 0, with finite gradients on both branches."""
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def minmax_normalize(maps: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Per-map min-max over space: `[B, H, W, N]` -> values in [0, 1]; a constant map gives 0."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return safe_div(maps - lo, span, span > eps)


def reweight(maps: jax.Array, token_mask: jax.Array, scale: float = 100.0) -> jax.Array:
    """`softmax(scale · A)` over the real tokens of each pixel; 0 elsewhere. `[B, H, W, T]`."""
    mask = jnp.asarray(token_mask, bool)[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(mask, scale * maps, -1e30), axis=-1)
    return jnp.where(mask, probs, 0.0)


def group_mean(maps: jax.Array, noun_weights: jax.Array) -> jax.Array:
    """Sub-token mean: `[B, H, W, T]` × `[B, N, T]` -> `[B, H, W, N]`."""
    return jnp.einsum("bhwt,bnt->bhwn", maps, noun_weights.astype(maps.dtype))


def all_token_weights(token_mask: jax.Array) -> jax.Array:
    """The "all tokens" ablation: every real token its own group, `[B, T]` -> `[B, T, T]`."""
    mask = jnp.asarray(token_mask, jnp.float32)
    return mask[:, :, None] * jnp.eye(mask.shape[-1], dtype=jnp.float32)
