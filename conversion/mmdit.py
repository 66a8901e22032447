"""SD3Transformer2DModel (SD3, SD3.5-medium, SD3.5-large): diffusers config -> Flax module.

The weights follow the generic name rule of `names.py`; the one exception is diffusers' persistent
`pos_embed.pos_embed` buffer, which the Flax model computes from the config and `rename` skips.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from conversion import names
from conversion.load import config_int, config_value, config_with_defaults
from ctcal_jax.models.mmdit import SD3Transformer2DModel

# diffusers' `SD3Transformer2DModel.__init__` arguments and their defaults.
_DEFAULTS = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}
_QK_NORMS = (None, "rms_norm")


def build(config: dict[str, Any], dtype: Any = jnp.float32) -> SD3Transformer2DModel:
    """The Flax module for a diffusers `SD3Transformer2DModel` config; unsupported values raise ValueError."""
    c = config_with_defaults(config, _DEFAULTS, "SD3Transformer2DModel")
    config_value(c, "qk_norm", _QK_NORMS)
    for key in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                "pooled_projection_dim", "out_channels"):
        config_int(c, key)
    if c["pos_embed_max_size"] is not None:
        config_int(c, "pos_embed_max_size")
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    if c["caption_projection_dim"] != inner:
        raise ValueError(
            f"config.json: caption_projection_dim={c['caption_projection_dim']} is not supported: the joint "
            f"blocks need it equal to num_attention_heads × attention_head_dim = {inner}"
        )
    if inner % 4:
        raise ValueError(f"config.json: num_attention_heads × attention_head_dim = {inner} is not supported: "
                         "the 2-D sin-cos position embedding needs a multiple of 4")
    dual = c["dual_attention_layers"]
    if not isinstance(dual, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in dual):
        raise ValueError(f"config.json: dual_attention_layers={dual!r} is not supported (a list of block indices)")
    return SD3Transformer2DModel(
        sample_size=c["sample_size"],
        patch_size=c["patch_size"],
        in_channels=c["in_channels"],
        num_layers=c["num_layers"],
        attention_head_dim=c["attention_head_dim"],
        num_attention_heads=c["num_attention_heads"],
        joint_attention_dim=c["joint_attention_dim"],
        caption_projection_dim=c["caption_projection_dim"],
        pooled_projection_dim=c["pooled_projection_dim"],
        out_channels=c["out_channels"],
        pos_embed_max_size=c["pos_embed_max_size"],
        dual_attention_layers=tuple(sorted(set(dual))),
        qk_norm=c["qk_norm"],
        dtype=dtype,
    )


def one_token_inputs(module: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract `(latents, timesteps, text states, pooled)` of one patch and one text token: the
    smallest inputs a joint-attention transformer (MM-DiT, FLUX) traces with."""
    p = module.patch_size
    return (
        jax.ShapeDtypeStruct((1, p, p, module.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, module.joint_attention_dim), jnp.float32),
        jax.ShapeDtypeStruct((1, module.pooled_projection_dim), jnp.float32),
    )


def abstract_params(module: SD3Transformer2DModel, config: dict[str, Any]) -> Any:
    """Parameter shapes, from a shape-only trace with one patch and one text token."""
    return jax.eval_shape(module.init, jax.random.key(0), *one_token_inputs(module))["params"]


def rename(key: str) -> names.Path | None:
    """The generic rule, except the position table buffer, which is computed rather than loaded."""
    if key == "pos_embed.pos_embed":
        return None
    return names.split_key(key)
