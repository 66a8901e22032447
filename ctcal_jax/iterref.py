"""IterRef (SPEC §6): refine the latent at one sampling step by Adam on attention-map losses.

Axes: B batch, H, W map side, T text tokens of one stream, G subjects (word groups; padded rows of a
weight array are all zero), h, w, C latent. Inputs:
- `maps` `[H, W, T]`: raw image→text attention of one sample, `aux["attn"][b]` as the denoisers
  return it (mean over heads and layers). For SD3 pass one stream (`[..., :77]` CLIP or `[..., 77:]`
  T5) with groups and mask built from that stream's tokenizer.
- `token_groups`: the subjects, either `list[list[int]]` (token positions, as
  `nouns.noun_token_groups` returns; SOT = 0 for CLIP) or a `[G, T]` float array of sub-token-mean
  weights (`nouns.group_weights`), `[B, G, T]` in `refine` for per-sample subjects.
- `token_mask` `[T]` bool (`[B, T]` in `refine`): the prompt's real tokens, the support of the
  re-weighting softmax (`nouns.real_token_mask`). None means every position except 0 (SOT): right
  for CLIP maps cut at the EOT (`maps[..., :eot]`), wrong for padded maps (the EOT and padding
  would take part in the softmax) and for T5 (no SOT), which need an explicit mask.

Processed subject maps `A_g` `[G, H, W]` (SPEC §2): `softmax(100 · A)` over the real tokens, mean of
each subject's sub-tokens, Gaussian smoothing (linear, so after the mean: G ≤ T maps to smooth).
Losses: `L_CN = max_g max(0, 1 − max_{x,y} A_g)`, `L_IoU` = mean over subject pairs of
`Σ min(A_g, A_g') / Σ (A_g + A_g')` (0 with fewer than two subjects), "cn+iou" = (L_CN + L_IoU) / 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctcal_jax import checks, nouns
from ctcal_jax import maps as mp

LOSSES = ("cn", "iou", "cn+iou")
TokenGroups = Union[Sequence[Sequence[int]], jax.Array]
DenoiseFn = Callable[[jax.Array, Any], tuple[Any, dict[str, jax.Array]]]


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")


def group_array(token_groups: TokenGroups, seq_len: int) -> jax.Array:
    """`list[list[int]]` -> `[G, seq_len]` float32 sub-token-mean weights; an array passes through
    (as float32). Lists are host data: turn them into arrays before a jit boundary, or close over them."""
    if isinstance(token_groups, (list, tuple)):
        groups = [list(g) for g in token_groups]
        return jnp.asarray(nouns.group_weights(groups, len(groups), seq_len))
    return jnp.asarray(token_groups, jnp.float32)


def default_token_mask(seq_len: int) -> jax.Array:
    """`[seq_len]` bool: every position except 0 (SOT); see the module docstring for when it fits."""
    return jnp.arange(seq_len) > 0


def subject_maps(
    maps: jax.Array,
    weights: jax.Array,
    token_mask: jax.Array | None = None,
    kernel_size: int = 3,
    sigma: float = 0.5,
    scale: float = 100.0,
) -> jax.Array:
    """Raw maps `[H, W, T]` -> processed subject maps `[G, H, W]`: re-weighting (softmax
    ×`scale` over `token_mask`), sub-token mean by `weights` `[G, T]`, Gaussian smoothing. Computed
    in float32 at least (float64 stays float64)."""
    maps = maps.astype(jnp.promote_types(maps.dtype, jnp.float32))
    if token_mask is None:
        token_mask = default_token_mask(maps.shape[-1])
    weighted = mp.reweight(maps[None], jnp.asarray(token_mask)[None], scale)  # [1, H, W, T]
    grouped = mp.group_mean(weighted, weights[None])  # [1, H, W, G]
    return mp.gaussian_smooth(grouped, kernel_size, sigma)[0].transpose(2, 0, 1)


def _valid(maps: jax.Array, valid: jax.Array | None) -> jax.Array:
    return jnp.ones(maps.shape[0], bool) if valid is None else jnp.asarray(valid, bool)


def cn_loss(maps: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """`max_g max(0, 1 − max_{x,y} A_g)` over processed maps `[G, H, W]` -> scalar; `valid` `[G]`
    bool leaves padded subjects out (0 when no subject is valid)."""
    per_subject = jax.nn.relu(1.0 - maps.max(axis=(1, 2)))
    return jnp.max(jnp.where(_valid(maps, valid), per_subject, 0.0), initial=0.0)


def iou_loss(maps: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean over subject pairs g < g' of `Σ min(A_g, A_g') / Σ (A_g + A_g')`, maps `[G, H, W]` (≥ 0)
    -> scalar; 0 with fewer than two (valid) subjects. Identical maps give 1/2, disjoint ones 0."""
    g = maps.shape[0]
    ok = _valid(maps, valid)
    inter = jnp.minimum(maps[:, None], maps[None]).sum(axis=(2, 3))  # [G, G]
    total = maps.sum(axis=(1, 2))
    union = total[:, None] + total[None]  # [G, G]
    pairs = jnp.triu(jnp.ones((g, g), bool), k=1) & ok[:, None] & ok[None]
    ratio = mp.safe_div(inter, union, pairs & (union > 0))
    n_pairs = pairs.sum()
    return mp.safe_div(ratio.sum(), n_pairs.astype(ratio.dtype), n_pairs > 0)


def losses(subject: jax.Array, valid: jax.Array | None = None, loss: str = "cn+iou") -> jax.Array:
    """The `loss` ("cn", "iou" or "cn+iou" = (L_CN + L_IoU) / 2) of processed maps `[G, H, W]`."""
    _check_loss(loss)
    if loss == "cn":
        return cn_loss(subject, valid)
    if loss == "iou":
        return iou_loss(subject, valid)
    return 0.5 * (cn_loss(subject, valid) + iou_loss(subject, valid))


def subject_loss(
    maps: jax.Array,
    token_groups: TokenGroups,
    loss: str = "cn+iou",
    *,
    token_mask: jax.Array | None = None,
    kernel_size: int = 3,
    sigma: float = 0.5,
    scale: float = 100.0,
) -> jax.Array:
    """Raw maps of one sample `[H, W, T]` -> scalar `loss` of its subjects (module docstring).

    `token_groups`: `list[list[int]]` positions or `[G, T]` weights (all-zero rows are padding and
    ignored). `token_mask` `[T]` bool, None = every position but 0. Smoothing k = 3, σ = 0.5 is
    SD 1.x/2.x at 16×16 (SD3: k = 5).
    """
    _check_loss(loss)
    weights = group_array(token_groups, maps.shape[-1])
    subject = subject_maps(maps, weights, token_mask, kernel_size, sigma, scale)
    return losses(subject, weights.sum(-1) > 0, loss)


def batch_loss(
    attn: jax.Array,
    token_groups: TokenGroups,
    token_mask: jax.Array | None = None,
    *,
    loss: str = "cn+iou",
    kernel_size: int = 3,
    sigma: float = 0.5,
    scale: float = 100.0,
    streams: Sequence[tuple[int, int]] | None = None,
) -> jax.Array:
    """`Σ_b` of each sample's subject loss, raw maps `attn` `[B, H, W, T]` -> scalar.

    `token_groups`: list (same subjects for every sample), `[G, T]` or `[B, G, T]` weights;
    `token_mask`: None, `[T]` or `[B, T]`. `streams`: `[start, end)` token ranges processed
    separately and averaged (SD3: `((0, 77), (77, 77 + 256))` for CLIP and T5, SPEC §6); None is
    one stream over all of T. Weights and mask index the whole token axis.
    """
    _check_loss(loss)
    checks.array("iterref", 'aux["attn"]', attn, ndim=4, layout="[B, H, W, T]: capture maps in the forward")
    b, seq_len = attn.shape[0], attn.shape[-1]
    weights = group_array(token_groups, seq_len)
    if weights.ndim not in (2, 3) or weights.shape[-1] != seq_len or (weights.ndim == 3 and weights.shape[0] != b):
        raise ValueError(f"iterref: token_groups weights must be [G, {seq_len}] or [{b}, G, {seq_len}] for maps "
                         f"{tuple(attn.shape)}, got {tuple(weights.shape)}")
    if token_mask is not None and np.shape(token_mask)[-1] != seq_len:
        raise ValueError(f"iterref: token_mask must have {seq_len} entries on its last axis, got {np.shape(token_mask)}")
    weights = jnp.broadcast_to(weights, (b,) + weights.shape[-2:])  # [B, G, T]
    mask = default_token_mask(seq_len) if token_mask is None else jnp.asarray(token_mask, bool)
    mask = jnp.broadcast_to(mask, (b, seq_len))

    def one(a, w, m):
        return losses(subject_maps(a, w, m, kernel_size, sigma, scale), w.sum(-1) > 0, loss)

    spans = ((0, seq_len),) if streams is None else tuple(streams)
    per_stream = [jax.vmap(one)(attn[..., s:e], weights[..., s:e], mask[..., s:e]) for s, e in spans]
    return (sum(per_stream) / len(per_stream)).sum()


def refine(
    denoise_fn: DenoiseFn,
    z: jax.Array,
    t: Any,
    token_groups: TokenGroups,
    *,
    n_iters: int = 50,
    lr: float | jax.Array,
    loss: str = "cn+iou",
    eps: float = 1e-3,
    token_mask: jax.Array | None = None,
    kernel_size: int = 3,
    sigma: float = 0.5,
    scale: float = 100.0,
    streams: Sequence[tuple[int, int]] | None = None,
) -> jax.Array:
    """`n_iters` Adam updates (`optax.adam(lr, eps=eps)`) of the latent `z` `[B, h, w, C]` on
    `batch_loss(aux["attn"], ...)`, where `denoise_fn(z, t) -> (pred, aux)` is the
    conditional-only forward at the step's timestep `t` (SPEC §6); returns the refined `z` (its dtype).

    `token_groups`, `token_mask` and `streams` as `batch_loss` takes them. The optimisation runs on
    a float32 copy of `z` inside `jax.lax.fori_loop`; jittable with `denoise_fn` and `loss` static
    (lists of groups closed over, or passed as arrays; `lr` may be traced). `lr` has no default:
    the paper's are not public (SPEC §6).
    """
    _check_loss(loss)
    dtype = z.dtype

    def objective(z32: jax.Array) -> jax.Array:
        _, aux = denoise_fn(z32.astype(dtype), t)
        return batch_loss(aux["attn"], token_groups, token_mask, loss=loss, kernel_size=kernel_size,
                          sigma=sigma, scale=scale, streams=streams)

    opt = optax.adam(lr, eps=eps)
    grad_fn = jax.grad(objective)

    def body(_, carry):
        z32, state = carry
        updates, state = opt.update(grad_fn(z32), state, z32)
        return optax.apply_updates(z32, updates), state

    z32 = z.astype(jnp.float32)
    z32, _ = jax.lax.fori_loop(0, n_iters, body, (z32, opt.init(z32)))
    return z32.astype(dtype)


@dataclasses.dataclass(frozen=True)
class IterRef:
    """IterRef inside a sampling loop (`sampling.generate(iterref=...)`, SPEC §6).

    Attributes:
      step: the step index k (0-based, before that step's update) at which to refine.
      lr: Adam's learning rate (no default: the paper's are not public; pick it with the sweep).
      n_iters: Adam updates (50).
      subjects: per prompt, the subject words (or `(start, end)` character spans); None finds them
        with `tagger` (nouns, SPEC §5). Mapped to token groups with `nouns.noun_token_groups`.
      tagger: "stanza" or a callable, as `nouns.noun_token_groups` takes it.
      loss: "cn", "iou" or "cn+iou".
      eps: Adam's ε (1e-3).
      resolution: UNet map side to capture; None = the coarsest down level with cross-attention
        (16×16 at SD 1.x/2.x's 64×64 latents).
      kernel_size, sigma: Gaussian smoothing (None: 3 for the UNet, 5 for MM-DiT; σ = 0.5).
      gsn_steps: optional `(start, end)` step-index range of GSN guidance ("Ours+"): one plain
        gradient step `z -= gsn_lr · ∇L` at each of those steps, after the refinement.
      gsn_lr: that step's size.
    """

    step: int
    lr: float
    n_iters: int = 50
    subjects: Sequence[Sequence[Any]] | None = None
    tagger: Any = "stanza"
    loss: str = "cn+iou"
    eps: float = 1e-3
    resolution: int | None = None
    kernel_size: int | None = None
    sigma: float = 0.5
    gsn_steps: tuple[int, int] | None = None
    gsn_lr: float = 0.0

    def __post_init__(self):
        _check_loss(self.loss)
        if self.n_iters < 0:
            raise ValueError(f"IterRef(n_iters={self.n_iters}): expected >= 0")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"IterRef(lr={self.lr}): expected a positive finite learning rate")
        if self.gsn_steps is not None and (len(self.gsn_steps) != 2 or self.gsn_steps[0] > self.gsn_steps[1]):
            raise ValueError(f"IterRef(gsn_steps={self.gsn_steps}): expected (start, end) with start <= end")
