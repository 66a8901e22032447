"""CLIPTextModel / CLIPTextModelWithProjection (transformers): config -> Flax module.

Keys follow the generic rule of `names.py` except two: the `position_ids` buffer (stored by older
transformers) is skipped, and recent transformers' flattened `CLIPTextModel` keys
(`encoder.layers.0...`) get back the `text_model.` prefix our parameter tree keeps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from conversion import names
from conversion.files import class_name
from conversion.load import config_value
from ctcal_jax.models.clip import CLIPTextModel


def build(config: dict[str, Any], dtype: Any = jnp.float32) -> CLIPTextModel:
    projected = class_name(config, "config.json") == "CLIPTextModelWithProjection"
    hidden = config.get("hidden_size", 512)
    heads = config.get("num_attention_heads", 8)
    if hidden % heads:
        raise ValueError(f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    return CLIPTextModel(
        vocab_size=config.get("vocab_size", 49408),
        hidden_size=hidden,
        intermediate_size=config.get("intermediate_size", 2048),
        num_hidden_layers=config.get("num_hidden_layers", 12),
        num_attention_heads=heads,
        max_position_embeddings=config.get("max_position_embeddings", 77),
        hidden_act=config_value({"hidden_act": config.get("hidden_act", "quick_gelu")}, "hidden_act",
                                ("quick_gelu", "gelu")),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        eos_token_id=config.get("eos_token_id", 49407),
        projection_dim=config.get("projection_dim", 512) if projected else None,
        dtype=dtype,
    )


def abstract_params(module: CLIPTextModel, config: dict[str, Any]) -> Any:
    ids = jax.ShapeDtypeStruct((1, module.max_position_embeddings), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


def rename(torch_key: str) -> names.Path | None:
    if torch_key.endswith("position_ids"):
        return None
    if not torch_key.startswith(("text_model.", "text_projection.")):
        torch_key = "text_model." + torch_key
    return names.split_key(torch_key)
