"""FluxTransformer2DModel (FLUX.1-dev, FLUX.1-schnell): diffusers config -> Flax module.

Every weight follows the generic name rule of `names.py` (diffusers' `pos_embed` has no weights).
The Flax module counts channels in the latents' terms: diffusers' `in_channels = 64` are the 16
latent channels packed 2×2 (`patch_size` 1 of the packed tokens), so the module gets
`patch_size=2, in_channels=16`, and `out_channels` likewise.

BFL's original module names (the reference `flux` code, and the kohya / ComfyUI LoRA files that use
them) map to diffusers' by `ORIGINAL_MODULES`; a fused original layer (`img_attn.qkv`, the single
blocks' `linear1` = q, k, v and the MLP input) holds several diffusers modules, its output rows
split between them by `original_split`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from conversion.load import config_int, config_with_defaults
from conversion.mmdit import one_token_inputs
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


def build(config: dict[str, Any], dtype: Any = jnp.float32) -> FluxTransformer2DModel:
    """The Flax module for a diffusers `FluxTransformer2DModel` config; unsupported values raise ValueError."""
    c = config_with_defaults(config, _DEFAULTS, "FluxTransformer2DModel")
    for key in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"):
        config_int(c, key)
    config_int(c, "num_single_layers", minimum=0)
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
    guidance = jax.ShapeDtypeStruct((1,), jnp.float32) if module.guidance_embeds else None
    return jax.eval_shape(module.init, jax.random.key(0), *one_token_inputs(module), guidance=guidance)["params"]


def _whole(n: int) -> list[np.ndarray]:
    return [np.arange(n)]


def _thirds(n: int) -> list[np.ndarray]:
    if n % 3:
        raise ValueError(f"{n} output rows do not split into q, k, v")
    return np.split(np.arange(n), 3)


def _qkv_mlp(n: int) -> list[np.ndarray]:
    """q, k, v of width D, then the MLP input of width 4·D (FLUX's mlp_ratio): 7·D rows."""
    if n % 7:
        raise ValueError(f"{n} output rows do not split into q, k, v (D each) and the MLP input (4·D)")
    d = n // 7
    return np.split(np.arange(n), [d, 2 * d, 3 * d])


def _swap_halves(n: int) -> list[np.ndarray]:
    """BFL's final modulation gives (shift, scale); diffusers' `AdaLayerNormContinuous` (scale, shift)."""
    if n % 2:
        raise ValueError(f"{n} output rows do not split into shift and scale")
    return [np.roll(np.arange(n), n // 2)]


# BFL module name -> (diffusers modules, in the order of the original's output rows; how the rows
# split). `{i}` is a block index.
ORIGINAL_MODULES: dict[str, tuple[tuple[str, ...], Callable[[int], list[np.ndarray]]]] = {
    "double_blocks.{i}.img_attn.qkv": (tuple(f"transformer_blocks.{{i}}.attn.to_{c}" for c in "qkv"), _thirds),
    "double_blocks.{i}.img_attn.proj": (("transformer_blocks.{i}.attn.to_out.0",), _whole),
    "double_blocks.{i}.img_mlp.0": (("transformer_blocks.{i}.ff.net.0.proj",), _whole),
    "double_blocks.{i}.img_mlp.2": (("transformer_blocks.{i}.ff.net.2",), _whole),
    "double_blocks.{i}.img_mod.lin": (("transformer_blocks.{i}.norm1.linear",), _whole),
    "double_blocks.{i}.txt_attn.qkv": (tuple(f"transformer_blocks.{{i}}.attn.add_{c}_proj" for c in "qkv"), _thirds),
    "double_blocks.{i}.txt_attn.proj": (("transformer_blocks.{i}.attn.to_add_out",), _whole),
    "double_blocks.{i}.txt_mlp.0": (("transformer_blocks.{i}.ff_context.net.0.proj",), _whole),
    "double_blocks.{i}.txt_mlp.2": (("transformer_blocks.{i}.ff_context.net.2",), _whole),
    "double_blocks.{i}.txt_mod.lin": (("transformer_blocks.{i}.norm1_context.linear",), _whole),
    "single_blocks.{i}.linear1": ((*(f"single_transformer_blocks.{{i}}.attn.to_{c}" for c in "qkv"),
                                   "single_transformer_blocks.{i}.proj_mlp"), _qkv_mlp),
    "single_blocks.{i}.linear2": (("single_transformer_blocks.{i}.proj_out",), _whole),
    "single_blocks.{i}.modulation.lin": (("single_transformer_blocks.{i}.norm.linear",), _whole),
    "img_in": (("x_embedder",), _whole),
    "txt_in": (("context_embedder",), _whole),
    "time_in.in_layer": (("time_text_embed.timestep_embedder.linear_1",), _whole),
    "time_in.out_layer": (("time_text_embed.timestep_embedder.linear_2",), _whole),
    "vector_in.in_layer": (("time_text_embed.text_embedder.linear_1",), _whole),
    "vector_in.out_layer": (("time_text_embed.text_embedder.linear_2",), _whole),
    "guidance_in.in_layer": (("time_text_embed.guidance_embedder.linear_1",), _whole),
    "guidance_in.out_layer": (("time_text_embed.guidance_embedder.linear_2",), _whole),
    "final_layer.linear": (("proj_out",), _whole),
    "final_layer.adaLN_modulation.1": (("norm_out.linear",), _swap_halves),
}
# Each name as a pattern that also matches kohya's spelling, every `.` written `_`.
_ORIGINAL_PATTERNS = {
    re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\.", "[._]")): name
    for name in ORIGINAL_MODULES
}


def _match_original(name: str) -> tuple[str, str | None] | None:
    """(the `ORIGINAL_MODULES` key, block index or None) that `name` spells, or None."""
    for pattern, original in _ORIGINAL_PATTERNS.items():
        m = pattern.fullmatch(name)
        if m:
            return original, m.groupdict().get("i")
    return None


def original_module(name: str) -> str | None:
    """The BFL module name (`double_blocks.0.img_attn.qkv`) that `name` spells, with `.` or kohya's `_`
    (`double_blocks_0_img_attn_qkv`); None for a name of no FLUX layer."""
    found = _match_original(name)
    return None if found is None else found[0].format(i=found[1])


def original_split(name: str, rows: int) -> list[tuple[str, np.ndarray]]:
    """The diffusers modules the BFL layer `name` (`original_module`) holds, each with the indices of
    its rows among the layer's `rows` output rows. Raises `ValueError` when the rows do not split."""
    found = _match_original(name)
    if found is None:
        raise ValueError(f"{name} is not a FLUX.1 module name")
    modules, split = ORIGINAL_MODULES[found[0]]
    return [(module.format(i=found[1]), idx) for module, idx in zip(modules, split(rows))]
