"""The FLUX.1 transformer (diffusers `FluxTransformer2DModel`) with captured joint-attention maps and TACA.

Axes: B batch, H, W latent spatial, C latent channels (NHWC, 16 for FLUX.1), p = 2 the packing,
h = H/p, w = W/p, N = h·w image tokens (row-major over h, w), T text tokens (T5), D model width
(heads × head dim), Dh head dim.
- `hidden_states`: VAE latents `[B, H, W, C]`, packed here 2×2 into `[B, N, C·p·p]` as FluxPipeline's
  `_pack_latents` does (per token the channels are ordered (c, dy, dx)) and the prediction unpacked
  back to `[B, H, W, C_out]`; or, as diffusers takes them, already packed tokens `[B, N, C·p·p]`
  with their `img_ids` (then the prediction stays packed, `[B, N, C_out·p·p]`).
- `timesteps` scalar or `[B]` in scheduler units 0..1000, like every denoiser here: diffusers'
  `FluxTransformer2DModel` takes `t / 1000` and multiplies by 1000 inside, so our `t` is its
  `timestep * 1000` (FluxPipeline passes `timestep=t / 1000`).
- `guidance` `[B]` (FLUX.1-dev, `guidance_embeds=True`; required there, refused otherwise): the
  guidance scale (e.g. 3.5), multiplied by 1000 inside as diffusers does.
- `encoder_hidden_states [B, T, joint_attention_dim]` (T5), `pooled_projections [B, 768]` (CLIP-L).
- Positions: `txt_ids [T, 3]` (default zeros) and `img_ids [N, 3]` (default `(0, row, col)`, as
  FluxPipeline's `_prepare_latent_image_ids`) give the 3-axis RoPE (`axes_dims_rope`, θ = 10000)
  applied to q and k of the joint sequence, which is text first, then image.
- `aux["attn"]` (only when `capture` is given): `[B, h, w, T]`, the image-query × text-key block of
  each joint softmax (normalised over text and image keys), mean over heads, then over the captured
  blocks. Blocks are indexed double-stream first, then single-stream: `0 .. num_layers-1` are
  `transformer_blocks_i`, `num_layers + j` is `single_transformer_blocks_j`; negative indices count
  from the last single block.
- `taca`: image-query × text-key logits of every joint attention (double and single blocks)
  multiplied by `taca.scales(t)[b]` (SPEC §4).

Names mirror diffusers module paths with list indices joined by `_`:
`transformer_blocks_0/attn/add_q_proj` is `transformer_blocks.0.attn.add_q_proj`,
`single_transformer_blocks_3/proj_mlp` is `single_transformer_blocks.3.proj_mlp`,
`transformer_blocks_0/ff/net_0/proj` is `transformer_blocks.0.ff.net.0.proj`. diffusers'
`pos_embed` (`FluxPosEmbed`) holds no weights; the RoPE tables are computed from the positions.
LoRA targets are searched (`re.search`) in these dotted paths, where a pattern for
`transformer_blocks.0.attn.to_q` also matches `single_transformer_blocks.0.attn.to_q`: anchor it with `^`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ctcal_jax import attention as attn_lib
from ctcal_jax import checks, lora
from ctcal_jax.attention import TACA, AttnCapture
from ctcal_jax.lora import Dense
from ctcal_jax.models.embeddings import TimestepEmbedding, batch_timesteps, timestep_embedding
from ctcal_jax.models.mmdit import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    CombinedTimestepTextProjEmbeddings,
    FeedForward,
    layer_norm,
    modulate,
)
from ctcal_jax.models.remat import Remat, block as remat_block

ROPE_THETA = 10000.0  # diffusers' `FluxPosEmbed(theta=10000)`
Rope = tuple[jax.Array, jax.Array]  # cos, sin: [S, Dh/2] float32


def rope_tables(ids: jax.Array, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> Rope:
    """Rotation angles of each position: `ids [S, n_axes]` -> `(cos, sin)`, each `[S, Dh/2]` float32.

    Axis `i` of the positions drives `axes_dims[i] / 2` consecutive rotation pairs with frequencies
    `θ^(−2k / axes_dims[i])`, k = 0 .. axes_dims[i]/2 − 1 (diffusers' `get_1d_rotary_pos_embed`
    per axis, concatenated; diffusers repeats each value twice, we keep one per pair).
    """
    ids = jnp.asarray(ids, jnp.float32)
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
        angles.append(ids[:, i, None] * freqs[None, :])
    angle = jnp.concatenate(angles, axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """Rotate the pairs `(x[2k], x[2k+1])` of `x [B, S, heads, Dh]` by the angles of `rope`, in float32."""
    cos, sin = (r[None, :, None, :] for r in rope)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def image_ids(h: int, w: int) -> np.ndarray:
    """FluxPipeline's image positions `(0, row, col)` of an `h × w` token grid, row-major: `[h·w, 3]`."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(h * w, 3).astype(np.float32)


def pack(x: jax.Array, p: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, (H/p)(W/p), C·p·p]`, each token's channels ordered (c, dy, dx)."""
    b, height, width, c = x.shape
    x = x.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (height // p) * (width // p), c * p * p)


def unpack(x: jax.Array, h: int, w: int, p: int) -> jax.Array:
    """Inverse of `pack`: `[B, h·w, C·p·p]` -> `[B, h·p, w·p, C]`."""
    b, _, cpp = x.shape
    x = x.reshape(b, h, w, cpp // (p * p), p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * p, w * p, cpp // (p * p))


class CombinedTimestepGuidanceTextProjEmbeddings(nn.Module):
    """`timestep_embedder(sincos_256(t)) + guidance_embedder(sincos_256(g)) + text_embedder(pooled)`."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timesteps: jax.Array, guidance: jax.Array, pooled: jax.Array) -> jax.Array:
        def embed(name: str, values: jax.Array) -> jax.Array:
            e = timestep_embedding(values, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0)
            return TimestepEmbedding(self.dim, dtype=self.dtype, name=name)(e.astype(self.dtype))

        time_guidance = embed("timestep_embedder", timesteps) + embed("guidance_embedder", guidance)
        return time_guidance + TimestepEmbedding(self.dim, dtype=self.dtype, name="text_embedder")(
            pooled.astype(self.dtype))


class FluxAttention(nn.Module):
    """diffusers `FluxAttention` + `FluxAttnProcessor`: joint attention over text then image tokens.

    `to_q/to_k/to_v` with RMS qk-norm (`norm_q`, `norm_k`). With a context (double-stream blocks):
    text projections `add_q_proj/add_k_proj/add_v_proj` with `norm_added_q/norm_added_k`, the text
    placed first, and output projections `to_out_0` (image) and `to_add_out` (text). Without one
    (single-stream blocks) `x` already holds `text_len` text tokens then the image tokens, and the
    output is returned unprojected (diffusers' `pre_only`).

    Returns `(out, txt_out | None, maps [B, N, T] | None)`: `out` is the image output `[B, N, D]`
    with a context, else the whole sequence `[B, T + N, D]`.
    """

    heads: int
    dim_head: int
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, rope: Rope, text_len: int = 0,
                 gamma: jax.Array | None = None, capture: bool = False):
        b, _, dim = x.shape
        inner = self.heads * self.dim_head

        def proj(name, y):
            y = Dense(inner, dtype=self.dtype, name=name)(y)
            return y.reshape(*y.shape[:2], self.heads, self.dim_head)  # [B, L, heads, Dh]

        def norm(name, y):
            return nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name=name)(y)

        q, k, v = norm("norm_q", proj("to_q", x)), norm("norm_k", proj("to_k", x)), proj("to_v", x)
        if context is not None:
            text_len = context.shape[1]
            q = jnp.concatenate([norm("norm_added_q", proj("add_q_proj", context)), q], axis=1)
            k = jnp.concatenate([norm("norm_added_k", proj("add_k_proj", context)), k], axis=1)
            v = jnp.concatenate([proj("add_v_proj", context), v], axis=1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out, maps = attn_lib.joint_attention(q, k, v, text_start=0, text_len=text_len, gamma=gamma,
                                             capture=capture, implementation=self.implementation)
        out = out.reshape(b, -1, inner)  # [B, T + N, D]
        if context is None:
            return out, None, maps
        txt = Dense(dim, dtype=self.dtype, name="to_add_out")(out[:, :text_len])
        return Dense(dim, dtype=self.dtype, name="to_out_0")(out[:, text_len:]), txt, maps


class FluxTransformerBlock(nn.Module):
    """Double-stream AdaLN-Zero block: image stream `norm1/attn/norm2/ff`, text stream
    `norm1_context/norm2_context/ff_context`, one joint attention. Returns (x, context, maps)."""

    heads: int
    dim_head: int
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, temb, rope, gamma=None, capture: bool = False):
        x0, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = AdaLayerNormZero(
            6, self.dtype, name="norm1")(x, temb)
        c0, (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = AdaLayerNormZero(
            6, self.dtype, name="norm1_context")(context, temb)
        img, txt, maps = FluxAttention(self.heads, self.dim_head, self.implementation, self.dtype, name="attn")(
            modulate(x0, shift_msa, scale_msa), modulate(c0, c_shift_msa, c_scale_msa),
            rope=rope, gamma=gamma, capture=capture)

        x = x + gate_msa[:, None] * img
        h = modulate(layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(self.dtype, name="ff")(h)

        context = context + c_gate_msa[:, None] * txt
        h = modulate(layer_norm(self.dtype, "norm2_context")(context), c_shift_mlp, c_scale_mlp)
        context = context + c_gate_mlp[:, None] * FeedForward(self.dtype, name="ff_context")(h)
        return x, context, maps


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over the joint sequence `[B, T + N, D]` (text first): one AdaLN-Zero
    modulation (`norm`), attention and an MLP (`proj_mlp`, GELU-tanh) in parallel, `proj_out` on
    their concatenation. Returns (x, maps)."""

    heads: int
    dim_head: int
    mlp_ratio: float = 4.0
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, rope, gamma=None, text_len: int = 0, capture: bool = False):
        dim = x.shape[-1]
        h, (shift, scale, gate) = AdaLayerNormZero(3, self.dtype, name="norm")(x, temb)
        h = modulate(h, shift, scale)
        mlp = nn.gelu(Dense(int(dim * self.mlp_ratio), dtype=self.dtype, name="proj_mlp")(h), approximate=True)
        attn, _, maps = FluxAttention(self.heads, self.dim_head, self.implementation, self.dtype, name="attn")(
            h, rope=rope, text_len=text_len, gamma=gamma, capture=capture)
        out = Dense(dim, dtype=self.dtype, name="proj_out")(jnp.concatenate([attn, mlp], axis=-1))
        return x + gate[:, None] * out, maps


class FluxTransformer2DModel(nn.Module):
    """diffusers `FluxTransformer2DModel` (FLUX.1-dev with `guidance_embeds`, FLUX.1-schnell without).

    Fields are diffusers' config keys, except the channel counts, which are the latents' (what the
    sampler reads): `patch_size` is the 2×2 packing (diffusers' config says 1, the patch of a packed
    token) and `in_channels`/`out_channels` are diffusers' divided by `patch_size²` (64 -> 16).
    `implementation="explicit"` forms the attention matrices; `remat` is what each block keeps for
    the backward pass (`models.remat`).
    """

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32
    remat: Remat = "none"

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        img_ids: jax.Array | None = None,
        txt_ids: jax.Array | None = None,
        guidance: jax.Array | float | None = None,
        *,
        capture: AttnCapture | None = None,
        taca: TACA | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        lora.check_collection(self)
        self._check_inputs(hidden_states, timesteps, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
                           guidance, capture, taca)
        b, p = hidden_states.shape[0], self.patch_size
        n_txt = encoder_hidden_states.shape[1]
        if hidden_states.ndim == 4:  # NHWC latents: packed here, positions from their grid by default
            grid = (hidden_states.shape[1] // p, hidden_states.shape[2] // p)
            tokens = pack(hidden_states.astype(self.dtype), p)
            img_ids = image_ids(*grid) if img_ids is None else img_ids
        else:  # packed tokens with their positions, as diffusers takes them
            tokens = hidden_states.astype(self.dtype)
            grid = _grid(img_ids, tokens.shape[1]) if capture is not None else None
        txt_ids = np.zeros((n_txt, len(self.axes_dims_rope)), np.float32) if txt_ids is None else txt_ids
        rope = rope_tables(jnp.concatenate([jnp.asarray(txt_ids, jnp.float32), jnp.asarray(img_ids, jnp.float32)]),
                           self.axes_dims_rope)
        inner = self.num_attention_heads * self.attention_head_dim
        captured = self._captured_blocks(capture)

        t = batch_timesteps(timesteps, b)
        gamma = None if taca is None else taca.scales(t)
        if self.guidance_embeds:
            temb = CombinedTimestepGuidanceTextProjEmbeddings(inner, self.dtype, name="time_text_embed")(
                t, batch_timesteps(guidance, b) * 1000.0, pooled_projections)
        else:
            temb = CombinedTimestepTextProjEmbeddings(inner, self.dtype, name="time_text_embed")(t, pooled_projections)
        context = Dense(inner, dtype=self.dtype, name="context_embedder")(encoder_hidden_states.astype(self.dtype))
        x = Dense(inner, dtype=self.dtype, name="x_embedder")(tokens)

        maps = []
        double = remat_block(FluxTransformerBlock, self.remat, static_argnums=(6,))  # capture
        for i in range(self.num_layers):
            block = double(self.num_attention_heads, self.attention_head_dim, self.implementation, self.dtype,
                           name=f"transformer_blocks_{i}")
            x, context, m = block(x, context, temb, rope, gamma, i in captured)
            if m is not None:
                maps.append(m)

        # diffusers concatenates and splits the streams inside every single block; once is enough.
        x = jnp.concatenate([context, x], axis=1)  # [B, T + N, D]
        single = remat_block(FluxSingleTransformerBlock, self.remat, static_argnums=(5, 6))  # text_len, capture
        for j in range(self.num_single_layers):
            block = single(self.num_attention_heads, self.attention_head_dim, implementation=self.implementation,
                           dtype=self.dtype, name=f"single_transformer_blocks_{j}")
            x, m = block(x, temb, rope, gamma, n_txt, self.num_layers + j in captured)
            if m is not None:
                maps.append(m)

        x = AdaLayerNormContinuous(self.dtype, name="norm_out")(x[:, n_txt:], temb)
        pred = Dense(p * p * self.out_channels, dtype=self.dtype, name="proj_out")(x)  # [B, N, C_out·p·p]
        if hidden_states.ndim == 4:
            pred = unpack(pred, *grid, p)

        aux: dict[str, jax.Array] = {}
        if capture is not None:
            aux["attn"] = jnp.mean(jnp.stack(maps), axis=0).reshape(b, *grid, n_txt)  # [B, h, w, T]
        return pred, aux

    def _check_inputs(self, x, timesteps, context, pooled, img_ids, txt_ids, guidance, capture, taca) -> None:
        """Trace-time checks of `__call__`'s arguments (`ctcal_jax.checks`)."""
        where = "FluxTransformer2DModel"
        p, n_axes = self.patch_size, len(self.axes_dims_rope)
        if np.ndim(x) == 3:
            checks.array(where, "hidden_states", x, ndim=3, last=self.in_channels * p * p,
                         layout="packed tokens [B, N, C·p·p]")
            if img_ids is None:
                raise ValueError(f"{where}: packed hidden_states [B, N, C·p·p] need img_ids [N, {n_axes}]; "
                                 "or pass the latents as [B, H, W, C]")
            n_img = x.shape[1]
        else:
            checks.array(where, "hidden_states", x, ndim=4, last=self.in_channels, layout="[B, H, W, C]")
            if x.shape[1] % p or x.shape[2] % p:
                raise ValueError(f"{where}: latent size {x.shape[1]}×{x.shape[2]} is not a multiple of "
                                 f"the {p}×{p} packing")
            n_img = (x.shape[1] // p) * (x.shape[2] // p)
        checks.array(where, "encoder_hidden_states", context, ndim=3, last=self.joint_attention_dim,
                     layout="[B, T, joint_attention_dim]")
        checks.array(where, "pooled_projections", pooled, ndim=2, last=self.pooled_projection_dim,
                     layout="[B, pooled_projection_dim]")
        checks.batch(where, ("hidden_states", x), ("encoder_hidden_states", context),
                     ("pooled_projections", pooled))
        checks.timesteps(where, timesteps, x.shape[0])
        for name, ids, n in (("img_ids", img_ids, n_img), ("txt_ids", txt_ids, context.shape[1])):
            if ids is not None and np.shape(ids) != (n, n_axes):
                raise ValueError(f"{where}: {name} must have shape ({n}, {n_axes}), got {np.shape(ids)}")
        if self.guidance_embeds and guidance is None:
            raise ValueError(f"{where}: this model embeds the guidance scale (guidance_embeds=True, FLUX.1-dev); "
                             "pass guidance, e.g. 3.5 per sample")
        if not self.guidance_embeds and guidance is not None:
            raise ValueError(f"{where}: guidance given, but this model has no guidance embedding "
                             "(guidance_embeds=False, FLUX.1-schnell)")
        if guidance is not None and np.shape(guidance) not in ((), (1,), (x.shape[0],)):
            raise ValueError(f"{where}: guidance must be a scalar or one per sample, shape ({x.shape[0]},), "
                             f"got shape {np.shape(guidance)}")
        if capture is not None and not isinstance(capture, AttnCapture):
            raise ValueError(f"{where}: capture must be an AttnCapture or None, got {type(capture).__name__}")
        if taca is not None and not isinstance(taca, TACA):
            raise ValueError(f"{where}: taca must be a TACA or None, got {type(taca).__name__}")

    def _captured_blocks(self, capture: AttnCapture | None) -> frozenset[int]:
        """Indices of the captured blocks: double-stream `0 .. num_layers-1`, then single-stream
        (negative indices count from the end)."""
        if capture is None:
            return frozenset()
        n = self.num_layers + self.num_single_layers
        if capture.blocks is None:
            return frozenset(range(n))
        out = set()
        for i in capture.blocks:
            if not -n <= i < n:
                raise ValueError(f"AttnCapture(blocks={capture.blocks}): block {i} does not exist (this model has "
                                 f"{self.num_layers} double-stream then {self.num_single_layers} single-stream blocks)")
            out.add(i % n)
        if not out:
            raise ValueError("AttnCapture(blocks=()) selects no block; use blocks=None for all")
        return frozenset(out)


def _grid(img_ids: Any, n: int) -> tuple[int, int]:
    """The `h × w` token grid of packed input, read from its positions (rows and columns from 0)."""
    try:
        ids = np.asarray(img_ids)
    except jax.errors.TracerArrayConversionError:
        raise ValueError("FluxTransformer2DModel: maps of packed hidden_states need img_ids known while tracing "
                         "(a numpy array, not a jit argument) to lay out the h × w grid; or pass the latents "
                         "as [B, H, W, C]") from None
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != n:
        raise ValueError(f"FluxTransformer2DModel: img_ids span a {h}×{w} grid, but there are {n} image tokens")
    return h, w
