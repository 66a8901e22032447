"""UNet2DConditionModel (SD 1.x / 2.x): diffusers config -> Flax module. The weights follow the
generic name rule of `names.py`; no key needs a rename."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from conversion.load import config_value
from ctcal_jax.models.unet import UNet2DConditionModel

# Config values we implement; anything else is refused by name rather than silently ignored.
_DEFAULTS_REQUIRED = {
    "act_fn": ("silu",),
    "center_input_sample": (False, None),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional", None),
    "time_embedding_act_fn": (None,),
    "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,),
    "resnet_time_scale_shift": ("default", None),
    "dual_cross_attention": (False, None),
    "only_cross_attention": (False, None),
    "num_class_embeds": (None,),
    "attention_type": ("default", None),
    "cross_attention_norm": (None,),
    "class_embeddings_concat": (False, None),
    "mid_block_only_cross_attention": (None, False),
    "resnet_skip_time_act": (False, None),
    "resnet_out_scale_factor": (1.0, 1, None),
    "time_embedding_dim": (None,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
}


def _per_block(config: dict[str, Any], key: str, n: int, default: Any) -> tuple:
    value = config.get(key, default)
    if value is None:
        value = default
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n or any(isinstance(v, (list, tuple)) for v in values):
        raise ValueError(f"config.json: {key}={value!r} must be an int or one int per block ({n} blocks)")
    return values


def build(config: dict[str, Any], dtype: Any = jnp.float32) -> UNet2DConditionModel:
    for key, allowed in _DEFAULTS_REQUIRED.items():
        if key in config:
            config_value(config, key, allowed)
    down = tuple(config["down_block_types"])
    up = tuple(config["up_block_types"])
    for kind in down:
        config_value({"down_block_types": kind}, "down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D"))
    for kind in up:
        config_value({"up_block_types": kind}, "up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"))
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    config_value({"mid_block_type": mid}, "mid_block_type", ("UNetMidBlock2DCrossAttn", None))
    n = len(config["block_out_channels"])
    # diffusers' legacy naming: `attention_head_dim` holds the number of heads when
    # `num_attention_heads` is unset.
    heads_key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    return UNet2DConditionModel(
        block_out_channels=tuple(config["block_out_channels"]),
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        layers_per_block=_per_block(config, "layers_per_block", n, 2),
        transformer_layers_per_block=_per_block(config, "transformer_layers_per_block", n, 1),
        num_attention_heads=_per_block(config, heads_key, n, 8),
        out_channels=config.get("out_channels", 4),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        downsample_padding=config.get("downsample_padding", 1),
        mid_block_scale_factor=config.get("mid_block_scale_factor", 1.0),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        conv_in_kernel=config.get("conv_in_kernel", 3),
        conv_out_kernel=config.get("conv_out_kernel", 3),
        dtype=dtype,
    )


def abstract_params(module: UNet2DConditionModel, config: dict[str, Any]) -> Any:
    """Parameter shapes, from a shape-only trace at a small spatial size."""
    context_dim = config.get("cross_attention_dim", 1280)
    if isinstance(context_dim, (list, tuple)):
        if len(set(context_dim)) != 1:
            raise ValueError(f"config.json: per-block cross_attention_dim={context_dim} is not supported")
        context_dim = context_dim[0]
    side = 2 ** len(module.block_out_channels)
    args = (
        jax.ShapeDtypeStruct((1, side, side, config.get("in_channels", 4)), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 2, context_dim), jnp.float32),
    )
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
