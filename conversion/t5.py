"""T5EncoderModel (transformers): config -> Flax module.

Keys follow the generic rule of `names.py`; `encoder.embed_tokens.weight`, when stored, is the tied
copy of `shared.weight` and fills the same parameter. Decoder keys (a full T5 checkpoint) are
skipped, as transformers skips them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from conversion import names
from conversion.load import config_value
from ctcal_jax.models.t5 import T5EncoderModel


def _feed_forward(config: dict[str, Any]) -> tuple[str, bool]:
    """transformers' reading of `feed_forward_proj`: `"{act}"` or `"gated-{act}"` (gated-gelu: tanh gelu)."""
    proj = config.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"config.json: feed_forward_proj={proj!r} is not `act` or `gated-act`")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    config_value({"dense_act_fn": act}, "dense_act_fn", ("relu", "gelu_new", "gelu"))
    return act, parts[0] == "gated"


def build(config: dict[str, Any], dtype: Any = jnp.float32) -> T5EncoderModel:
    act, gated = _feed_forward(config)
    return T5EncoderModel(
        vocab_size=config.get("vocab_size", 32128),
        d_model=config.get("d_model", 512),
        d_kv=config.get("d_kv", 64),
        d_ff=config.get("d_ff", 2048),
        num_layers=config.get("num_layers", 6),
        num_heads=config.get("num_heads", 8),
        relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
        dense_act_fn=act,
        is_gated_act=gated,
        dtype=dtype,
    )


def abstract_params(module: T5EncoderModel, config: dict[str, Any]) -> Any:
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


def rename(torch_key: str) -> names.Path | None:
    if torch_key.startswith("decoder."):
        return None
    if torch_key == "encoder.embed_tokens.weight":
        torch_key = "shared.weight"
    return names.split_key(torch_key)
