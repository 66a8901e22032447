"""The SD3 / SD3.5 MM-DiT (diffusers `SD3Transformer2DModel`) with captured joint-attention maps and TACA.

Axes: B batch, H, W latent spatial, C latent channels (NHWC), p patch size, h = H/p, w = W/p,
L_img = h·w image tokens (row-major over h, w), T text tokens, D model width (N heads × head dim).
- `hidden_states [B, H, W, C_in]`, `timesteps` scalar or `[B]` (scheduler units 0..1000),
  `encoder_hidden_states [B, T, C_ctx]`, `pooled_projections [B, P]`
  -> `(pred [B, H, W, C_out], aux)`.
- `aux["attn"]` (only when `capture` is given): `[B, h, w, T]`, the image-query × text-key block of
  each joint softmax (normalised over image and text keys), mean over heads, then over the captured
  blocks. SD3 orders the joint sequence image first, then text.
- `taca`: image-query × text-key logits of every joint attention multiplied by `taca.scales(t)[b]`
  (SPEC §4). The SD3.5-medium image-only second attention (`attn2`) is plain and gives no maps.

Names mirror diffusers module paths with list indices joined by `_`:
`transformer_blocks_3/attn/add_q_proj` is `transformer_blocks.3.attn.add_q_proj`,
`transformer_blocks_0/ff/net_0/proj` is `transformer_blocks.0.ff.net.0.proj`. diffusers' persistent
`pos_embed.pos_embed` buffer is not a parameter here: the sin-cos table is computed from the config.
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
from ctcal_jax.models.remat import Remat, block as remat_block
from ctcal_jax.models.unet import Proj


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    """diffusers' `LayerNorm(elementwise_affine=False, eps=1e-6)`, two-pass variance as PyTorch."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False,
                        dtype=dtype, name=name)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * (1 + scale) + shift` with per-sample `[B, D]` shift/scale over `[B, L, D]`."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed(dim: int, h: int, w: int, grid: int, base_size: int, *, interpolation_scale: float = 1.0
                     ) -> jax.Array:
    """diffusers' 2-D sin-cos table, cropped: `[h·w, dim]` float32 (row-major over h, w).

    diffusers builds the table over a `grid × grid` lattice with coordinates `i / (grid / base_size)`
    and takes the centred `h × w` window (`PatchEmbed.cropped_pos_embed`); without
    `pos_embed_max_size` it uses `grid = h` (rows) and `w` (columns). Each position's vector is
    `[sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)]` (x = column, y = row), `ω_k = 10000^(−k / (dim/4))`.
    Only the window is computed, so large `pos_embed_max_size` costs nothing.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    grid_h, grid_w = (grid, grid) if grid else (h, w)
    top, left = (grid_h - h) // 2, (grid_w - w) // 2
    interp = np.float32(interpolation_scale)
    rows = jnp.arange(top, top + h, dtype=jnp.float32) / np.float32(grid_h / base_size) / interp
    cols = jnp.arange(left, left + w, dtype=jnp.float32) / np.float32(grid_w / base_size) / interp
    omega = jnp.asarray(1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4)), jnp.float32)

    def one_d(pos):  # [n] -> [n, dim/2]
        out = pos[:, None] * omega[None, :]
        return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)

    emb_x = jnp.broadcast_to(one_d(cols)[None, :, :], (h, w, dim // 2))
    emb_y = jnp.broadcast_to(one_d(rows)[:, None, :], (h, w, dim // 2))
    return jnp.concatenate([emb_x, emb_y], axis=-1).reshape(h * w, dim)


class PatchEmbed(nn.Module):
    """`proj` (p×p conv, stride p) + the (cropped) sin-cos position table. `[B, H, W, C] -> [B, h·w, D]`."""

    embed_dim: int
    patch_size: int
    base_size: int
    pos_embed_max_size: int | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        b, height, width, _ = x.shape
        h, w = height // p, width // p
        if self.pos_embed_max_size and (h > self.pos_embed_max_size or w > self.pos_embed_max_size):
            raise ValueError(f"latent of {h}×{w} patches exceeds pos_embed_max_size={self.pos_embed_max_size}")
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(x)
        pos = sincos_pos_embed(self.embed_dim, h, w, self.pos_embed_max_size or 0, self.base_size)
        return (x.reshape(b, h * w, self.embed_dim) + pos.astype(self.dtype)[None]).astype(self.dtype)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """`timestep_embedder(sincos_256(t)) + text_embedder(pooled)`; both are linear-SiLU-linear."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timesteps: jax.Array, pooled: jax.Array) -> jax.Array:
        t = timestep_embedding(timesteps, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        t = TimestepEmbedding(self.dim, dtype=self.dtype, name="timestep_embedder")(t.astype(self.dtype))
        return t + TimestepEmbedding(self.dim, dtype=self.dtype, name="text_embedder")(pooled.astype(self.dtype))


class AdaLayerNormZero(nn.Module):
    """`linear(silu(temb))` split in `chunks` (6: shift/scale/gate for attention and MLP; 9 for
    SD3.5's `SD35AdaLayerNormZeroX`, adding shift/scale/gate of `attn2`). Returns (LayerNorm(x), chunks)."""

    chunks: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        emb = Dense(self.chunks * x.shape[-1], dtype=self.dtype, name="linear")(nn.silu(temb))
        return layer_norm(self.dtype, "norm")(x), jnp.split(emb, self.chunks, axis=-1)


class AdaLayerNormContinuous(nn.Module):
    """`LayerNorm(x) * (1 + scale) + shift` with `scale, shift = linear(silu(temb))` (that order)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        emb = Dense(2 * x.shape[-1], dtype=self.dtype, name="linear")(nn.silu(temb))
        scale, shift = jnp.split(emb, 2, axis=-1)
        return modulate(layer_norm(self.dtype, "norm")(x), shift, scale)


class FeedForward(nn.Module):
    """`net_0/proj` -> GELU (tanh approximation) -> `net_2`, hidden width 4·D."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = nn.gelu(Proj(4 * dim, self.dtype, name="net_0")(x), approximate=True)
        return Dense(dim, dtype=self.dtype, name="net_2")(h)


class JointAttention(nn.Module):
    """diffusers `Attention` + `JointAttnProcessor2_0`.

    Image projections `to_q/to_k/to_v/to_out_0`; with a context, text projections
    `add_q_proj/add_k_proj/add_v_proj` and (unless `context_pre_only`) `to_add_out`; RMS qk-norm
    (`norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`) when `qk_norm="rms_norm"`.
    Without a context (`attn2`) it is plain self-attention over the image tokens.

    Returns `(img_out [B, L_img, D], txt_out [B, T, D] | None, maps [B, L_img, T] | None)`.
    """

    heads: int
    dim_head: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, gamma: jax.Array | None = None,
                 capture: bool = False):
        b, n_img, dim = x.shape
        inner = self.heads * self.dim_head

        def proj(name, y):
            y = Dense(inner, dtype=self.dtype, name=name)(y)
            return y.reshape(*y.shape[:2], self.heads, self.dim_head)  # [B, L, N, Dh]

        def norm(name, y):
            return nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name=name)(y) if self.qk_norm else y

        q, k, v = norm("norm_q", proj("to_q", x)), norm("norm_k", proj("to_k", x)), proj("to_v", x)
        if context is None:
            out, _ = attn_lib.attention(q, k, v, implementation=self.implementation)
            return Dense(dim, dtype=self.dtype, name="to_out_0")(out.reshape(b, n_img, inner)), None, None

        n_txt = context.shape[1]
        q = jnp.concatenate([q, norm("norm_added_q", proj("add_q_proj", context))], axis=1)
        k = jnp.concatenate([k, norm("norm_added_k", proj("add_k_proj", context))], axis=1)
        v = jnp.concatenate([v, proj("add_v_proj", context)], axis=1)
        out, maps = attn_lib.joint_attention(q, k, v, text_start=n_img, text_len=n_txt, gamma=gamma,
                                             capture=capture, implementation=self.implementation)
        out = out.reshape(b, n_img + n_txt, inner)
        img = Dense(dim, dtype=self.dtype, name="to_out_0")(out[:, :n_img])
        txt = None if self.context_pre_only else Dense(dim, dtype=self.dtype, name="to_add_out")(out[:, n_img:])
        return img, txt, maps


class JointTransformerBlock(nn.Module):
    """AdaLN-Zero joint block: image stream `norm1/attn/norm2/ff`, text stream
    `norm1_context/ff_context/norm2_context`; `use_dual_attention` adds the image-only `attn2`
    (SD3.5 MMDiT-X); `context_pre_only` (last block) drops the text stream's output."""

    heads: int
    dim_head: int
    context_pre_only: bool = False
    use_dual_attention: bool = False
    qk_norm: str | None = None
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, temb, gamma=None, capture: bool = False):
        def attention(name, **kw):
            return JointAttention(self.heads, self.dim_head, self.qk_norm, implementation=self.implementation,
                                  dtype=self.dtype, name=name, **kw)

        x0, mods = AdaLayerNormZero(9 if self.use_dual_attention else 6, self.dtype, name="norm1")(x, temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.context_pre_only:
            c_norm = AdaLayerNormContinuous(self.dtype, name="norm1_context")(context, temb)
        else:
            c0, c_mods = AdaLayerNormZero(6, self.dtype, name="norm1_context")(context, temb)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
            c_norm = modulate(c0, c_shift_msa, c_scale_msa)

        img, txt, maps = attention("attn", context_pre_only=self.context_pre_only)(
            modulate(x0, shift_msa, scale_msa), c_norm, gamma=gamma, capture=capture)
        x = x + gate_msa[:, None] * img
        if self.use_dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2[:, None] * attention("attn2")(modulate(x0, shift_msa2, scale_msa2))[0]
        h = modulate(layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(self.dtype, name="ff")(h)
        if self.context_pre_only:
            return x, None, maps

        context = context + c_gate_msa[:, None] * txt
        h = modulate(layer_norm(self.dtype, "norm2_context")(context), c_shift_mlp, c_scale_mlp)
        context = context + c_gate_mlp[:, None] * FeedForward(self.dtype, name="ff_context")(h)
        return x, context, maps


class SD3Transformer2DModel(nn.Module):
    """diffusers `SD3Transformer2DModel` (SD3, SD3.5-medium with `dual_attention_layers`, SD3.5-large).

    Fields are diffusers' config keys. `implementation="explicit"` forms the attention matrices
    (the reference path the tests compare the fused one with). `remat` is what each joint block
    keeps for the backward pass (`models.remat`).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
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
        *,
        capture: AttnCapture | None = None,
        taca: TACA | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        lora.check_collection(self)
        self._check_inputs(hidden_states, timesteps, encoder_hidden_states, pooled_projections, capture, taca)
        b, height, width, _ = hidden_states.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}×{width} is not a multiple of patch_size={p}")
        h, w = height // p, width // p
        inner = self.num_attention_heads * self.attention_head_dim
        captured = self._captured_blocks(capture)

        t = batch_timesteps(timesteps, b)
        gamma = None if taca is None else taca.scales(t)
        x = PatchEmbed(inner, p, self.sample_size // p, self.pos_embed_max_size, self.dtype,
                       name="pos_embed")(hidden_states.astype(self.dtype))
        temb = CombinedTimestepTextProjEmbeddings(inner, self.dtype, name="time_text_embed")(t, pooled_projections)
        context = Dense(self.caption_projection_dim, dtype=self.dtype,
                        name="context_embedder")(encoder_hidden_states.astype(self.dtype))

        maps = []
        block_cls = remat_block(JointTransformerBlock, self.remat, static_argnums=(5,))  # capture
        for i in range(self.num_layers):
            block = block_cls(
                self.num_attention_heads, self.attention_head_dim,
                context_pre_only=i == self.num_layers - 1,
                use_dual_attention=i in self.dual_attention_layers,
                qk_norm=self.qk_norm, implementation=self.implementation, dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )
            x, context, m = block(x, context, temb, gamma, i in captured)
            if m is not None:
                maps.append(m)

        x = AdaLayerNormContinuous(self.dtype, name="norm_out")(x, temb)
        x = Dense(p * p * self.out_channels, dtype=self.dtype, name="proj_out")(x)
        # Unpatchify: token (i, j) holds its p×p patch as (row, column, channel).
        pred = x.reshape(b, h, w, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        pred = pred.reshape(b, height, width, self.out_channels)

        aux: dict[str, jax.Array] = {}
        if capture is not None:
            aux["attn"] = jnp.mean(jnp.stack(maps), axis=0).reshape(b, h, w, -1)  # [B, h, w, T]
        return pred, aux

    def _check_inputs(self, x, timesteps, context, pooled, capture, taca) -> None:
        """Trace-time checks of `__call__`'s arguments (`ctcal_jax.checks`)."""
        where = "SD3Transformer2DModel"
        checks.array(where, "hidden_states", x, ndim=4, last=self.in_channels, layout="[B, h, w, C]")
        checks.array(where, "encoder_hidden_states", context, ndim=3, last=self.joint_attention_dim,
                      layout="[B, T, joint_attention_dim]")
        checks.array(where, "pooled_projections", pooled, ndim=2, last=self.pooled_projection_dim,
                      layout="[B, pooled_projection_dim]")
        checks.batch(where, ("hidden_states", x), ("encoder_hidden_states", context),
                     ("pooled_projections", pooled))
        checks.timesteps(where, timesteps, x.shape[0])
        if capture is not None and not isinstance(capture, AttnCapture):
            raise ValueError(f"{where}: capture must be an AttnCapture or None, got {type(capture).__name__}")
        if taca is not None and not isinstance(taca, TACA):
            raise ValueError(f"{where}: taca must be a TACA or None, got {type(taca).__name__}")

    def _captured_blocks(self, capture: AttnCapture | None) -> frozenset[int]:
        """Indices of the joint blocks whose maps are captured (negative indices count from the end)."""
        if capture is None:
            return frozenset()
        if capture.blocks is None:
            return frozenset(range(self.num_layers))
        out = set()
        for i in capture.blocks:
            if not -self.num_layers <= i < self.num_layers:
                raise ValueError(f"AttnCapture(blocks={capture.blocks}): block {i} does not exist "
                                 f"(this model has {self.num_layers} joint blocks)")
            out.add(i % self.num_layers)
        if not out:
            raise ValueError("AttnCapture(blocks=()) selects no joint block; use blocks=None for all")
        return frozenset(out)
