"""AutoencoderKL (diffusers): config -> Flax module.

Keys follow the generic rule of `names.py`; checkpoints saved before diffusers renamed the mid-block
attention (`query`, `key`, `value`, `proj_attn`) are mapped to `to_q`, `to_k`, `to_v`, `to_out.0`,
as diffusers does on load.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from conversion import names
from conversion.load import config_value
from ctcal_jax.models.vae import AutoencoderKL

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def build(config: dict[str, Any], dtype: Any = jnp.float32) -> AutoencoderKL:
    channels = tuple(config.get("block_out_channels", (64,)))
    for key, kind, default in (("down_block_types", "DownEncoderBlock2D", ("DownEncoderBlock2D",)),
                               ("up_block_types", "UpDecoderBlock2D", ("UpDecoderBlock2D",))):
        blocks = tuple(config.get(key, default))
        for block in blocks:
            config_value({key: block}, key, (kind,))
        if len(blocks) != len(channels):
            raise ValueError(f"config.json: {len(blocks)} {key} for {len(channels)} block_out_channels")
    if "act_fn" in config:
        config_value(config, "act_fn", ("silu",))
    return AutoencoderKL(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        block_out_channels=channels,
        layers_per_block=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        norm_num_groups=config.get("norm_num_groups", 32),
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor"),
        dtype=dtype,
    )


def abstract_params(module: AutoencoderKL, config: dict[str, Any]) -> Any:
    side = 2 ** (len(module.block_out_channels) - 1)
    images = jax.ShapeDtypeStruct((1, side, side, module.in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def rename(torch_key: str) -> names.Path | None:
    *module, attr, leaf = torch_key.split(".")
    if attr in _LEGACY_ATTENTION and "attentions" in module:
        torch_key = ".".join([*module, _LEGACY_ATTENTION[attr], leaf])
    return names.split_key(torch_key)
