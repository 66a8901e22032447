"""The KL autoencoder (diffusers `AutoencoderKL`): images <-> latents, and the pipelines' latent scaling.

Axes: B batch, H, W image size, h, w latent size (H / 2^(blocks−1)), C channels (NHWC), Z latent
channels (4 for SD 1.x/2.x, 16 for SD3/FLUX).
- `vae.apply(p, images, method="encode")`: images `[B, H, W, 3]` in [-1, 1] -> `(mean, logvar)`, each
  `[B, h, w, Z]`, logvar clamped to [-30, 20] as diffusers' `DiagonalGaussianDistribution` does.
- `vae.apply(p, latents, method="decode")`: unscaled latents `[B, h, w, Z]` -> images `[B, H, W, 3]`.
- `scale_latents` / `unscale_latents`: what the pipelines apply between the VAE and the denoiser.

Names mirror diffusers module paths with list indices joined by `_`:
`encoder/down_blocks_0/resnets_1/conv1`, `decoder/mid_block/attentions_0/to_q`, `quant_conv`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ctcal_jax import attention as attn_lib
from ctcal_jax import checks
from ctcal_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

_EPS = 1e-6  # diffusers builds every VAE norm with eps 1e-6


class VAEAttention(nn.Module):
    """The mid-block self-attention: `group_norm`, `to_q`, `to_k`, `to_v`, `to_out_0` (biased), residual.

    One head of width C (diffusers sets `attention_head_dim` to the channel count).
    """

    groups: int
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.groups, _EPS, self.dtype, "group_norm")(x).reshape(b, h * w, c)

        def proj(name):
            return nn.Dense(c, dtype=self.dtype, name=name)(y)[:, :, None, :]

        out, _ = attn_lib.attention(proj("to_q"), proj("to_k"), proj("to_v"), implementation=self.implementation)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out.reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` without timestep: `resnets_0`, `attentions_0` (optional), `resnets_1`."""

    groups: int
    add_attention: bool = True
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, groups=self.groups, eps=_EPS, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.implementation, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, groups=self.groups, eps=_EPS, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """`resnets_0 .. resnets_{n-1}`, then `downsamplers_0` (stride 2, right/bottom pad) unless last."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=_EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`resnets_0 .. resnets_{n-1}`, then `upsamplers_0` (nearest ×2 + conv) unless last."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=_EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """`conv_in`, `down_blocks_*`, `mid_block`, `conv_norm_out`, `conv_out` (2·Z channels: mean, logvar)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(self.block_out_channels[0], 3, self.dtype, "conv_in")(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            x = DownEncoderBlock2D(ch, self.layers_per_block, self.groups, i < last, self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(self.groups, self.mid_block_add_attention, self.implementation, self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(self.groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """`conv_in`, `mid_block`, `up_blocks_*` (widest first), `conv_norm_out`, `conv_out`."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        channels = tuple(reversed(self.block_out_channels))
        x = conv(channels[0], 3, self.dtype, "conv_in")(z)
        x = MidBlock(self.groups, self.mid_block_add_attention, self.implementation, self.dtype, name="mid_block")(x)
        last = len(channels) - 1
        for i, ch in enumerate(channels):
            x = UpDecoderBlock2D(ch, self.layers_per_block + 1, self.groups, i < last, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(self.groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`. `__call__` is diffusers' deterministic forward: decode(mean).

    `scaling_factor` / `shift_factor` are the config values the pipelines use (see `scale_latents`);
    the 16-channel SD3/FLUX VAEs have no quant convs (`use_quant_conv=False`, `use_post_quant_conv=False`).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.block_out_channels, self.layers_per_block, self.latent_channels,
                               self.norm_num_groups, self.mid_block_add_attention, self.implementation, self.dtype)
        self.decoder = Decoder(self.block_out_channels, self.layers_per_block, self.out_channels,
                               self.norm_num_groups, self.mid_block_add_attention, self.implementation, self.dtype)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, self.dtype, "quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, self.dtype, "post_quant_conv")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images `[B, H, W, C_in]` in [-1, 1] -> posterior `(mean, logvar)`, each `[B, h, w, Z]`."""
        checks.array("AutoencoderKL.encode", "images", images, ndim=4, last=self.in_channels, layout="[B, H, W, C]")
        moments = self.encoder(images.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents `[B, h, w, Z]` -> images `[B, H, W, C_out]` (about [-1, 1], not clipped)."""
        checks.array("AutoencoderKL.decode", "latents", latents, ndim=4, last=self.latent_channels, layout="[B, h, w, Z]")
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])


def scale_latents(latents: jax.Array, vae: AutoencoderKL) -> jax.Array:
    """VAE latents -> denoiser latents: `(z − shift) · scale` (SD3/FLUX), `z · scale` when no shift (SD)."""
    shift = vae.shift_factor or 0.0
    return (latents - shift) * vae.scaling_factor


def unscale_latents(latents: jax.Array, vae: AutoencoderKL) -> jax.Array:
    """Denoiser latents -> VAE latents for `decode`: the inverse of `scale_latents`."""
    shift = vae.shift_factor or 0.0
    return latents / vae.scaling_factor + shift
