"""The SD 1.x / 2.x UNet (diffusers `UNet2DConditionModel`) with captured cross-attention maps.

Axes: B batch, H, W latent spatial, C channels (NHWC), T text tokens, N heads, D head dim.
- `sample` `[B, H, W, C_in]`, `timesteps` scalar or `[B]` (0..1000), `encoder_hidden_states`
  `[B, T, C_text]` -> `(pred [B, H, W, C_out], aux)`.
- `aux["attn"]` (only when `capture` is given): `[B, r, r, T]`, the `attn2` probabilities of the
  layers whose map has side `r ∈ capture.resolutions`, mean over heads, then over layers.

Names mirror diffusers module paths with list indices joined by `_`:
`down_blocks_2/attentions_0/transformer_blocks_0/attn2/to_q` is
`down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_q`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ctcal_jax import attention as attn_lib
from ctcal_jax import checks, lora
from ctcal_jax.attention import AttnCapture
from ctcal_jax.lora import Dense
from ctcal_jax.models.embeddings import TimestepEmbedding, batch_timesteps, timestep_embedding
from ctcal_jax.models.remat import Remat, block as remat_block
from ctcal_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

Maps = list[jax.Array]  # each [B, h, w, T] float32


class Attention(nn.Module):
    """diffusers `Attention`: `to_q`, `to_k`, `to_v` (no bias), `to_out_0`; self- or cross-attention.

    Returns `(out [B, L, C], maps [B, L, S] | None)`; maps are the head-mean probabilities.
    """

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, capture: bool = False):
        context = x if context is None else context
        inner = self.heads * self.dim_head

        def proj(name, y):
            y = Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(y)
            return y.reshape(*y.shape[:2], self.heads, self.dim_head)

        q, k, v = proj("to_q", x), proj("to_k", context), proj("to_v", context)
        out, maps = attn_lib.attention(q, k, v, capture=capture, implementation=self.implementation)
        out = out.reshape(*out.shape[:2], inner)
        return Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(out), maps


class GEGLUFeedForward(nn.Module):
    """`net_0/proj` (GEGLU, exact GELU) -> `net_2`."""

    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.dim * self.mult
        h = Proj(2 * inner, self.dtype, name="net_0")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return Dense(self.dim, dtype=self.dtype, name="net_2")(h * nn.gelu(gate, approximate=False))


class Proj(nn.Module):
    """A module holding one Dense called `proj` (diffusers `GEGLU.proj`, `GELU.proj`)."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        return Dense(self.features, dtype=self.dtype, name="proj")(x)


class BasicTransformerBlock(nn.Module):
    """LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + GEGLU feed-forward."""

    dim: int
    heads: int
    dim_head: int
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, capture: bool):
        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

        def attn(name):
            return Attention(self.heads, self.dim_head, self.dim, implementation=self.implementation,
                             dtype=self.dtype, name=name)

        x = x + attn("attn1")(norm("norm1")(x))[0]
        h, maps = attn("attn2")(norm("norm2")(x), context, capture=capture)
        x = x + h
        x = x + GEGLUFeedForward(self.dim, dtype=self.dtype, name="ff")(norm("norm3")(x))
        return x, maps


class Transformer2DModel(nn.Module):
    """GroupNorm, `proj_in` (1×1 conv or linear), transformer blocks, `proj_out`, residual."""

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, capture: bool) -> tuple[jax.Array, Maps]:
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            y = Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, self.dtype, "proj_in")(y).reshape(b, h * w, inner)
        maps = []
        for i in range(self.num_layers):
            block = BasicTransformerBlock(inner, self.heads, self.dim_head, self.implementation,
                                          dtype=self.dtype, name=f"transformer_blocks_{i}")
            y, m = block(y, context, capture)
            if m is not None:
                maps.append(m.reshape(b, h, w, -1))
        if self.use_linear_projection:
            y = Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, self.dtype, "proj_out")(y.reshape(b, h, w, inner))
        return x + y, maps


@dataclasses.dataclass(frozen=True)
class _Shared:
    """Settings every block of one UNet shares. The resnets and transformers are the blocks `remat`
    applies to (`models.remat`)."""

    groups: int
    eps: float
    use_linear_projection: bool
    implementation: attn_lib.Implementation
    dtype: Any
    remat: Remat = "none"

    def resnet(self, out_channels: int, name: str, scale: float = 1.0) -> ResnetBlock2D:
        return remat_block(ResnetBlock2D, self.remat)(
            out_channels, groups=self.groups, eps=self.eps, output_scale_factor=scale, dtype=self.dtype, name=name)

    def transformer(self, channels: int, heads: int, layers: int, name: str) -> Transformer2DModel:
        return remat_block(Transformer2DModel, self.remat, static_argnums=(3,))(  # capture
            heads, channels // heads, layers, self.groups, self.use_linear_projection, self.implementation,
            self.dtype, name=name)


def _attend(block: Transformer2DModel, x, context, resolutions, maps: Maps):
    x, m = block(x, context, x.shape[1] in resolutions)  # positional: remat keeps `capture` static
    maps.extend(m)
    return x


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (with `heads`) or `DownBlock2D` (`heads=0`). Returns (x, skips, maps)."""

    out_channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    add_downsample: bool
    downsample_padding: int
    shared: _Shared

    @nn.compact
    def __call__(self, x, temb, context, resolutions):
        skips, maps = [], []
        for j in range(self.num_layers):
            x = self.shared.resnet(self.out_channels, f"resnets_{j}")(x, temb)
            if self.heads:
                block = self.shared.transformer(self.out_channels, self.heads, self.transformer_layers, f"attentions_{j}")
                x = _attend(block, x, context, resolutions, maps)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.shared.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips, maps


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnet, transformer, resnet."""

    heads: int
    transformer_layers: int
    scale: float
    shared: _Shared

    @nn.compact
    def __call__(self, x, temb, context, resolutions):
        ch, maps = x.shape[-1], []
        x = self.shared.resnet(ch, "resnets_0", self.scale)(x, temb)
        x = _attend(self.shared.transformer(ch, self.heads, self.transformer_layers, "attentions_0"),
                    x, context, resolutions, maps)
        return self.shared.resnet(ch, "resnets_1", self.scale)(x, temb), maps


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` (with `heads`) or `UpBlock2D`; consumes its skips, last first."""

    out_channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    shared: _Shared

    @nn.compact
    def __call__(self, x, skips, temb, context, resolutions, upsample_size):
        maps = []
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = self.shared.resnet(self.out_channels, f"resnets_{j}")(x, temb)
            if self.heads:
                block = self.shared.transformer(self.out_channels, self.heads, self.transformer_layers, f"attentions_{j}")
                x = _attend(block, x, context, resolutions, maps)
        if upsample_size is not None:
            x = Upsample2D(self.out_channels, self.shared.dtype, name="upsamplers_0")(x, upsample_size)
        return x, maps


_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


class UNet2DConditionModel(nn.Module):
    """diffusers `UNet2DConditionModel` for SD 1.x / 2.x. Per-block tuples are in down-block order.

    `num_attention_heads` is per down block (diffusers' legacy `attention_head_dim` config value
    means the same). `implementation="explicit"` forms attention matrices (reference path).
    `remat` is what each resnet and transformer block keeps for the backward pass (`models.remat`).
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32
    remat: Remat = "none"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        *,
        capture: AttnCapture | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        lora.check_collection(self)
        self._check_inputs(sample, timesteps, encoder_hidden_states, capture)
        shared = _Shared(self.norm_num_groups, self.norm_eps, self.use_linear_projection,
                         self.implementation, self.dtype, self.remat)
        resolutions = () if capture is None else tuple(capture.resolutions)
        context = encoder_hidden_states.astype(self.dtype)
        n_blocks = len(self.block_out_channels)
        maps: Maps = []

        t = timestep_embedding(batch_timesteps(timesteps, sample.shape[0]), self.block_out_channels[0],
                               flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.freq_shift)
        temb = TimestepEmbedding(4 * self.block_out_channels[0], dtype=self.dtype,
                                 name="time_embedding")(t.astype(self.dtype))

        x = conv(self.block_out_channels[0], self.conv_in_kernel, self.dtype, "conv_in")(sample.astype(self.dtype))
        skips = [x]
        for i, (kind, ch) in enumerate(zip(self.down_block_types, self.block_out_channels)):
            heads = self.num_attention_heads[i] if _DOWN[kind] else 0
            block = DownBlock(ch, self.layers_per_block[i], heads, self.transformer_layers_per_block[i],
                              i < n_blocks - 1, self.downsample_padding, shared, name=f"down_blocks_{i}")
            x, s, m = block(x, temb, context, resolutions)
            skips += s
            maps += m

        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            x, m = MidBlock(self.num_attention_heads[-1], self.transformer_layers_per_block[-1],
                            self.mid_block_scale_factor, shared, name="mid_block")(x, temb, context, resolutions)
            maps += m

        for i, kind in enumerate(self.up_block_types):
            d = n_blocks - 1 - i  # the down block this up block mirrors
            n = self.layers_per_block[d] + 1
            block_skips, skips = skips[-n:], skips[:-n]
            # Up-sample to the next skip's size: diffusers' `upsample_size`, right for odd sizes too.
            size = skips[-1].shape[1:3] if i < n_blocks - 1 else None
            heads = self.num_attention_heads[d] if _UP[kind] else 0
            block = UpBlock(self.block_out_channels[d], n, heads, self.transformer_layers_per_block[d], shared,
                            name=f"up_blocks_{i}")
            x, m = block(x, block_skips, temb, context, resolutions, size)
            maps += m

        x = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(x))
        pred = conv(self.out_channels, self.conv_out_kernel, self.dtype, "conv_out")(x)
        aux: dict[str, jax.Array] = {}
        if capture is not None:
            aux["attn"] = mean_maps(maps, resolutions)
        return pred, aux


    def _check_inputs(self, sample, timesteps, context, capture) -> None:
        """Trace-time checks of `__call__`'s arguments (`ctcal_jax.checks`)."""
        where = "UNet2DConditionModel"
        params = self.variables.get("params")
        conv_in = checks.kernel_shape(params, "conv_in")
        checks.array(where, "sample", sample, ndim=4, last=None if conv_in is None else conv_in[2], layout="[B, h, w, C]")
        to_k = checks.find_kernel(params, ("attn2", "to_k"))
        checks.array(where, "encoder_hidden_states", context, ndim=3, last=None if to_k is None else to_k[0],
                      layout="[B, T, D]")
        checks.batch(where, ("sample", sample), ("encoder_hidden_states", context))
        checks.timesteps(where, timesteps, sample.shape[0])
        if capture is not None and not isinstance(capture, AttnCapture):
            raise ValueError(f"{where}: capture must be an AttnCapture or None, got {type(capture).__name__}")


def mean_maps(maps: Maps, resolutions: tuple[int, ...]) -> jax.Array:
    """Average per-layer maps `[B, h, w, T]`; maps of other sizes are resized to the largest first."""
    if not maps:
        raise ValueError(f"AttnCapture(resolutions={resolutions}) matched no cross-attention layer of this UNet "
                         "at this input size")
    h, w = max((m.shape[1:3] for m in maps), key=lambda s: s[0] * s[1])
    maps = [m if m.shape[1:3] == (h, w) else jax.image.resize(m, (m.shape[0], h, w, m.shape[3]), "bilinear")
            for m in maps]
    return jnp.mean(jnp.stack(maps), axis=0)
