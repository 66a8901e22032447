"""The one attention function every ctcal_jax model calls, with captured maps and TACA.

Axes: B batch, L query positions, S key positions, N heads, D head dim, T text tokens.
Queries, keys and values are `[B, L|S, N, D]`, the layout of `jax.nn.dot_product_attention`.

Two kinds of attention carry text:
- cross-attention (UNet `attn2`): every query is an image position, every key a text token;
- joint attention (MM-DiT, FLUX): one sequence holding image and text positions; the text occupies
  a contiguous span `[text_start, text_start + T)`, the image the rest (before or after it).

Both return `(out, maps)`. `maps` is `None` unless asked for, else `[B, L_img, T]`: the image-query
× text-key block of the attention probabilities, averaged over heads. On the fused path the maps are
rebuilt from the kernel's log-sum-exp (`exp(Q K_txtᵀ/√D − lse)`), so the full attention matrix is
never formed by this code; the explicit path forms it and is the reference the tests compare with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ctcal_jax import checks

Implementation = Literal["auto", "fused", "explicit"]


def resolve(implementation: Implementation) -> Implementation:
    """`"auto"`: the explicit path on CPU, the fused one on GPU/TPU.

    XLA:CPU has no fused attention kernel: its `dot_product_attention` forms the same matrices as
    the explicit path, and its backward pass is slower (measured on a 1024-token self-attention
    layer: ~125 ms forward+backward against ~37 ms for the explicit path; docs/benchmarks.md), so on
    CPU the explicit path is the fast one. Pass `"fused"` to force the kernel path anywhere.
    """
    if implementation == "auto":
        return "explicit" if jax.default_backend() == "cpu" else "fused"
    return implementation


@dataclasses.dataclass(frozen=True)
class AttnCapture:
    """Which attention maps a denoiser returns in `aux["attn"]` (SPEC §2).

    Attributes:
      resolutions: UNet only. Cross-attention layers whose spatial map has side `r` (height) for an
        `r` in this tuple are captured. Maps of different sizes are resized (bilinear) to the
        largest before averaging.
      blocks: MM-DiT / FLUX only. Indices of the joint blocks to capture; `None` means all.
    """

    resolutions: tuple[int, ...] = (16,)
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        checks.int_tuple("AttnCapture", "resolutions", self.resolutions)
        checks.int_tuple("AttnCapture", "blocks", self.blocks, allow_none=True)
        # Lists are accepted and stored as tuples: the capture is hashed as a static argument.
        object.__setattr__(self, "resolutions", tuple(int(r) for r in self.resolutions))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))


@dataclasses.dataclass(frozen=True)
class TACA:
    """Temperature-adjusted cross-modal attention (SPEC §4).

    Image-query × text-key logits are multiplied by `gamma` (after the 1/√D scaling) for samples
    whose timestep is at least `t_threshold` (scheduler units, 0..1000); all other logits unchanged.
    `gamma` may also be a `[B]` array, one γ0 per sample (the sampler's conditional-only TACA).
    """

    gamma: float = 1.2
    t_threshold: float = 970.0

    def __post_init__(self):
        checks.positive_float("TACA", "gamma", self.gamma)
        if isinstance(self.t_threshold, (int, float)) and not math.isfinite(self.t_threshold):
            raise ValueError(f"TACA: t_threshold must be a finite timestep (scheduler units), got {self.t_threshold!r}")

    def scales(self, timesteps: jax.Array) -> jax.Array:
        """Per-sample logit multiplier γ(t): `[B]` float32."""
        t = jnp.asarray(timesteps, jnp.float32)
        return jnp.where(t >= self.t_threshold, jnp.asarray(self.gamma, jnp.float32), jnp.float32(1.0))


def _scale(q: jax.Array, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _kernel(q: jax.Array, bias: jax.Array | None) -> str:
    """cuDNN flash attention where it applies (GPU, 16-bit, head dim a multiple of 8 up to 128),
    else XLA. `implementation=None` would mean XLA everywhere in current JAX."""
    d = q.shape[-1]
    if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 128 and bias is None):
        return "cudnn"
    return "xla"


def _fused(q, k, v, scale, with_lse: bool = False, bias=None, is_causal: bool = False):
    """`jax.nn.dot_product_attention` -> (out, lse `[B, L, N]` or None).

    cuDNN refuses some shapes and older GPUs at trace time; such a call falls back to XLA with a
    warning rather than failing the model.
    """
    kw = dict(bias=bias, scale=scale, is_causal=is_causal, return_residual=with_lse)
    kernel = _kernel(q, bias)
    try:
        result = jax.nn.dot_product_attention(q, k, v, implementation=kernel, **kw)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        if kernel == "xla":
            raise
        warnings.warn(f"cuDNN attention unavailable for q {q.shape} {q.dtype} ({e}); using XLA", stacklevel=2)
        result = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
    return result if with_lse else (result, None)


def _maps_from_lse(q: jax.Array, k_txt: jax.Array, lse: jax.Array, scale: float) -> jax.Array:
    """Per-head probabilities of the (q, k_txt) block given the row log-sum-exp over all keys.

    q `[B, L, N, D]`, k_txt `[B, T, N, D]`, lse `[B, L, N]` -> `[B, L, N, T]` float32.
    """
    logits = jnp.einsum("blnd,btnd->blnt", q, k_txt, preferred_element_type=jnp.float32) * scale
    return jnp.exp(logits - lse.astype(jnp.float32)[..., None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_with_maps(q, k, v, scale: float, rows: tuple[int, int], keys: tuple[int, int]):
    """Fused attention plus the head-mean probabilities of queries `q[:, rows]` × keys `k[:, keys]`.

    The kernel returns its log-sum-exp without a gradient, so the maps get their own backward
    pass: through `lse = log Σ_j exp(s q·k_j)`, `∂lse/∂q = s · softmax(q kᵀ) k` (an attention call
    with the keys as values) and `∂lse/∂k_j = s · P_j q` (the value-gradient of an attention call).
    Neither forms the attention matrix.
    """
    return _fused_with_maps_fwd(q, k, v, scale, rows, keys)[0]


def _fused_with_maps_fwd(q, k, v, scale, rows, keys):
    out, lse = _fused(q, k, v, scale, with_lse=True)
    maps = _maps_from_lse(q[:, slice(*rows)], k[:, slice(*keys)], lse[:, slice(*rows)], scale).mean(axis=2)
    return (out, maps), (q, k, v, lse)


def _fused_with_maps_bwd(scale, rows, keys, res, cotangents):
    q, k, v, lse = res
    g_out, g_maps = cotangents
    _, attention_vjp = jax.vjp(lambda q_, k_, v_: _fused(q_, k_, v_, scale)[0], q, k, v)
    dq, dk, dv = attention_vjp(g_out)
    r, t = slice(*rows), slice(*keys)
    q_r, k_t = q[:, r], k[:, t]
    probs = _maps_from_lse(q_r, k_t, lse[:, r], scale)  # [B, Lr, N, T]
    d_logits = probs * (g_maps.astype(jnp.float32)[:, :, None, :] / q.shape[2])  # through the head mean
    d_lse = -d_logits.sum(-1)  # [B, Lr, N]
    dq_r = scale * jnp.einsum("blnt,btnd->blnd", d_logits, k_t.astype(jnp.float32))
    dk_t = scale * jnp.einsum("blnt,blnd->btnd", d_logits, q_r.astype(jnp.float32))
    # The log-sum-exp's own gradient, with two more fused calls.
    weighted_keys = _fused(q_r, k, k, scale)[0].astype(jnp.float32)  # softmax(q kᵀ) k
    dq_r = dq_r + scale * d_lse[..., None] * weighted_keys
    _, value_vjp = jax.vjp(lambda k_: _fused(q_r, k, k_, scale)[0], k)
    (dk_lse,) = value_vjp((scale * d_lse[..., None] * q_r.astype(jnp.float32)).astype(k.dtype))
    dq = dq.at[:, r].add(dq_r.astype(dq.dtype))
    dk = (dk + dk_lse).at[:, t].add(dk_t.astype(dk.dtype))
    return dq, dk, dv


_fused_with_maps.defvjp(_fused_with_maps_fwd, _fused_with_maps_bwd)


Block = tuple[tuple[int, int], tuple[int, int]]  # (query rows, key columns) of a map block


def _scaled_logits(q, k, scale: float) -> jax.Array:
    """`s · q kᵀ` in float32: `[B, N, L, S]`."""
    return jnp.einsum("blnd,bsnd->bnls", q, k, preferred_element_type=jnp.float32) * scale


def _explicit_logits(logits, mult, bias, is_causal: bool) -> jax.Array:
    """The scaled logits `× mult`, `+ bias`, with the causal mask."""
    if mult is not None:
        logits = logits * mult
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        length, keys = logits.shape[-2:]
        logits = jnp.where(jnp.tril(jnp.ones((length, keys), bool)), logits, jnp.finfo(jnp.float32).min)
    return logits


def _weighted_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    # The weighted sum of values stays in float32, as flash kernels accumulate it.
    return jnp.einsum("bnls,bsnd->blnd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _block_maps(probs: jax.Array, block: Block | None) -> jax.Array | None:
    """Head-mean probabilities of a (rows, columns) block: `[B, L_r, S_c]`."""
    if block is None:
        return None
    (r0, r1), (c0, c1) = block
    return probs[:, :, r0:r1, c0:c1].mean(axis=1)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum `x` over the axes broadcasting expanded to reach its shape from `shape`."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _explicit(q, k, v, mult, bias, scale: float, is_causal: bool, block: Block | None):
    """Softmax attention with the probability matrix formed: (out, head-mean maps of `block` or None).

    `mult` (broadcastable to `[B, N, L, S]`) multiplies the scaled logits (TACA), `bias` is added.
    The backward pass is written out, as flash attention's is: the softmax's row term is
    `rowsum(dO ⊙ O)`, taken on the `[L, D]` side. Autodiff of the same formula takes it, and the
    scaling, on the `[B, N, L, S]` matrices, two more passes over them; on XLA:CPU that made a
    1024-token layer's forward+backward ~2× slower. The probabilities are kept, not recomputed,
    so the step's FLOPs stay the model's.
    """
    probs = jax.nn.softmax(_explicit_logits(_scaled_logits(q, k, scale), mult, bias, is_causal), axis=-1)
    return _weighted_values(probs, v), _block_maps(probs, block)


def _explicit_fwd(q, k, v, mult, bias, scale, is_causal, block):
    scaled = _scaled_logits(q, k, scale)
    logits = _explicit_logits(scaled, mult, bias, is_causal)
    probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    out = _weighted_values(probs, v)
    residuals = (q, k, v, mult, bias, probs, out, None if mult is None else scaled)
    return (out, _block_maps(probs, block)), residuals


def _explicit_bwd(scale, is_causal, block, res, cotangents):
    q, k, v, mult, bias, probs, out, scaled = res  # probs [B, N, L, S]
    g_out, g_maps = cotangents
    f32 = jnp.float32
    g_out = g_out.astype(f32)
    dv = jnp.einsum("bnls,blnd->bsnd", probs, g_out).astype(v.dtype)
    d_probs = jnp.einsum("blnd,bsnd->bnls", g_out, v, preferred_element_type=f32)
    row = jnp.einsum("blnd,blnd->bnl", g_out, out.astype(f32))  # Σ_s P·dP, from the [L, D] side
    if block is not None:  # the maps' head mean feeds every head's probabilities of the block
        (r0, r1), (c0, c1) = block
        g_block = g_maps.astype(f32) / q.shape[2]  # [B, L_r, S_c]
        row = row.at[:, :, r0:r1].add(jnp.einsum("bnlt,blt->bnl", probs[:, :, r0:r1, c0:c1], g_block))
        d_probs = d_probs.at[:, :, r0:r1, c0:c1].add(g_block[:, None])
    d_logits = probs * (d_probs - row[..., None])
    d_bias = None if bias is None else _sum_to(d_logits, bias.shape).astype(bias.dtype)
    d_mult = None
    if mult is not None:
        d_mult = _sum_to(d_logits * scaled, jnp.shape(mult)).astype(mult.dtype)
        d_logits = d_logits * mult
    dq = scale * jnp.einsum("bnls,bsnd->blnd", d_logits, k, preferred_element_type=f32)
    dk = scale * jnp.einsum("bnls,blnd->bsnd", d_logits, q, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, d_mult, d_bias


_explicit.defvjp(_explicit_fwd, _explicit_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    capture: bool = False,
    implementation: Implementation = "auto",
    scale: float | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Queries `[B, L, N, D]` attending to keys/values `[B, S, N, D]` (cross-attention: S = T text tokens).

    `bias` (broadcastable to `[B, N, L, S]`) is added to the scaled logits (T5's relative positions);
    `is_causal` lets query `i` see keys `0..i` only (CLIP's text transformer). Neither combines with
    `capture`, which no text encoder needs.

    Returns `out [B, L, N, D]` and, when `capture`, the head-mean probabilities `[B, L, S]` float32.
    """
    scale, implementation = _scale(q, scale), resolve(implementation)
    if capture and (bias is not None or is_causal):
        raise ValueError("attention: capture=True does not support bias or is_causal")
    if implementation == "explicit":
        block = ((0, q.shape[1]), (0, k.shape[1])) if capture else None
        return _explicit(q, k, v, None, bias, scale, is_causal, block)
    if capture:
        return _fused_with_maps(q, k, v, scale, (0, q.shape[1]), (0, k.shape[1]))
    return _fused(q, k, v, scale, bias=bias, is_causal=is_causal)


def joint_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    text_start: int,
    text_len: int,
    gamma: jax.Array | None = None,
    capture: bool = False,
    implementation: Implementation = "auto",
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Joint attention over one sequence of image and text positions `[B, L, N, D]`.

    Text positions are `[text_start, text_start + text_len)`; the image positions are the rest and
    must be contiguous (text first, as FLUX, or text last, as SD3). `gamma` `[B]` enables TACA:
    image-query × text-key logits are multiplied by `gamma[b]`.

    Returns `out [B, L, N, D]` and, when `capture`, the image-query × text-key block of the joint
    softmax averaged over heads, `[B, L_img, T]` float32.
    """
    length = q.shape[1]
    if text_start not in (0, length - text_len):
        raise ValueError(
            f"joint_attention: text span [{text_start}, {text_start + text_len}) must sit at the "
            f"start or the end of the {length}-long sequence"
        )
    scale, implementation = _scale(q, scale), resolve(implementation)
    txt = slice(text_start, text_start + text_len)
    img = slice(text_len, length) if text_start == 0 else slice(0, length - text_len)
    is_txt = np.zeros((length,), bool)
    is_txt[txt] = True

    if implementation == "explicit":
        mult = None
        if gamma is not None:
            # The image-query × text-key block from iotas: as a host constant it would be embedded
            # in the program once per attention call (85 MB each for FLUX.1 at 1024²).
            rows = jax.lax.broadcasted_iota(jnp.int32, (length, 1), 0)
            cols = jax.lax.broadcasted_iota(jnp.int32, (1, length), 1)
            block = (((rows >= img.start) & (rows < img.stop)) & ((cols >= txt.start) & (cols < txt.stop)))
            block = block.astype(jnp.float32)  # [L, S]
            g = jnp.asarray(gamma, jnp.float32)[:, None, None, None]
            mult = 1.0 + (g - 1.0) * block  # [B, 1, L, S]
        block = ((img.start, img.stop), (txt.start, txt.stop)) if capture else None
        return _explicit(q, k, v, mult, None, scale, False, block)

    if gamma is None:
        if capture:
            return _fused_with_maps(q, k, v, scale, (img.start, img.stop), (txt.start, txt.stop))
        return _fused(q, k, v, scale)

    # TACA: image-query rows see keys [k_img, γ·k_txt]; text-query rows see the plain keys.
    # Two fused calls with the same total work as one; no attention matrix is formed here.
    g = jnp.asarray(gamma, jnp.float32)[:, None, None, None]
    k_scaled = k * jnp.where(is_txt[None, :, None, None], g, 1.0).astype(k.dtype)
    q_img = q[:, img]
    if capture:
        out_img, maps = _fused_with_maps(q_img, k_scaled, v, scale, (0, q_img.shape[1]), (txt.start, txt.stop))
    else:
        (out_img, _), maps = _fused(q_img, k_scaled, v, scale), None
    out_txt, _ = _fused(q[:, txt], k, v, scale)
    parts = (out_txt, out_img) if text_start == 0 else (out_img, out_txt)
    return jnp.concatenate(parts, axis=1), maps
