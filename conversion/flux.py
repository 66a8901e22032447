"""FluxTransformer2DModel (FLUX.1-dev, FLUX.1-schnell): diffusers config -> Flax module.

Every weight follows the generic name rule of `names.py` (diffusers' `pos_embed` has no weights).
The Flax module counts channels in the latents' terms: diffusers' `in_channels = 64` are the 16
latent channels packed 2×2 (`patch_size` 1 of the packed tokens), so the module gets
`patch_size=2, in_channels=16`, and `out_channels` likewise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ctcal_jax.models.flux import FluxTransformer2DModel

# diffusers' `FluxTransformer2DModel.__init__` arguments and their defaults.
_DEFAULTS = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
PACK = 2  # FluxPipeline packs 2×2 latent pixels into one token


def _int(config: dict[str, Any], key: str, minimum: int = 1) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.json: {key}={value!r} is not supported (an integer ≥ {minimum} is expected)")
    return value


def build(config: dict[str, Any], dtype: Any = jnp.float32) -> FluxTransformer2DModel:
    """The Flax module for a diffusers `FluxTransformer2DModel` config; unsupported values raise ValueError."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS)
    if unknown:
        raise ValueError(f"config.json: keys {unknown} are not supported by FluxTransformer2DModel here "
                         f"(known keys: {sorted(_DEFAULTS)})")
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    if c["out_channels"] is None:
        c["out_channels"] = c["in_channels"]
    for key in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"):
        _int(c, key)
    _int(c, "num_single_layers", minimum=0)
    if c["patch_size"] != 1:
        raise ValueError(f"config.json: patch_size={c['patch_size']} is not supported (FluxPipeline's tokens are "
                         "2×2-packed latents with patch_size 1)")
    for key in ("in_channels", "out_channels"):
        if c[key] % (PACK * PACK):
            raise ValueError(f"config.json: {key}={c[key]} is not supported: the {PACK}×{PACK}-packed tokens "
                             f"hold a multiple of {PACK * PACK} channels")
    if not isinstance(c["guidance_embeds"], bool):
        raise ValueError(f"config.json: guidance_embeds={c['guidance_embeds']!r} is not supported (true or false)")
    axes = c["axes_dims_rope"]
    if (not isinstance(axes, (list, tuple)) or len(axes) != 3
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2 for d in axes)
            or sum(axes) != c["attention_head_dim"]):
        raise ValueError(f"config.json: axes_dims_rope={axes!r} is not supported (three even sizes summing to "
                         f"attention_head_dim={c['attention_head_dim']})")
    return FluxTransformer2DModel(
        patch_size=PACK,
        in_channels=c["in_channels"] // (PACK * PACK),
        out_channels=c["out_channels"] // (PACK * PACK),
        num_layers=c["num_layers"],
        num_single_layers=c["num_single_layers"],
        attention_head_dim=c["attention_head_dim"],
        num_attention_heads=c["num_attention_heads"],
        joint_attention_dim=c["joint_attention_dim"],
        pooled_projection_dim=c["pooled_projection_dim"],
        guidance_embeds=c["guidance_embeds"],
        axes_dims_rope=tuple(axes),
        dtype=dtype,
    )


def abstract_params(module: FluxTransformer2DModel, config: dict[str, Any]) -> Any:
    """Parameter shapes, from a shape-only trace with one token of each kind."""
    p = module.patch_size
    args = (
        jax.ShapeDtypeStruct((1, p, p, module.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, module.joint_attention_dim), jnp.float32),
        jax.ShapeDtypeStruct((1, module.pooled_projection_dim), jnp.float32),
    )
    guidance = jax.ShapeDtypeStruct((1,), jnp.float32) if module.guidance_embeds else None
    return jax.eval_shape(module.init, jax.random.key(0), *args, guidance=guidance)["params"]
