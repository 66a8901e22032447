"""CLIP text transformer (transformers `CLIPTextModel`, `CLIPTextModelWithProjection`).

Axes: B batch, T tokens, C hidden width, P projection width, N heads, D head dim.
- `input_ids` `[B, T]` int -> dict with
  - `"last_hidden_state"` `[B, T, C]`: after `final_layer_norm`;
  - `"pooled"`: the final state at each row's EOS token `[B, C]` (transformers' `pooler_output`), or,
    with a projection, that state through `text_projection` `[B, P]` (`text_embeds`);
  - `"hidden_states"` (only when asked): a tuple of `num_layers + 1` arrays `[B, T, C]`, the
    embeddings then every layer's output, before `final_layer_norm` (transformers' convention).
- Attention is causal: token `i` sees tokens `0..i`; no padding mask (what the pipelines run).

Names mirror transformers module paths with list indices joined by `_`:
`text_model/encoder/layers_0/self_attn/q_proj` is `text_model.encoder.layers.0.self_attn.q_proj`.
Recent transformers flattens `CLIPTextModel` (no `text_model.` prefix); we keep the prefix, which
`CLIPTextModelWithProjection`, hub checkpoints and diffusers LoRA files all use.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from ctcal_jax import attention as attn_lib
from ctcal_jax import checks, lora
from ctcal_jax.lora import Dense
from ctcal_jax.models.remat import Remat, block as remat_block

Activation = Literal["quick_gelu", "gelu"]

# transformers' pre-#24773 configs carry eos_token_id=2 and pool at argmax(input_ids).
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's `x · sigmoid(1.702 x)`."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token `pooled` reads in each row `[B]`, exactly as transformers picks it.

    Legacy configs (`eos_token_id == 2`) take the largest id (the EOS of CLIP's vocabulary); others
    take the first position holding `eos_token_id` (0 when a row has none).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    """Causal self-attention: `q_proj`, `k_proj`, `v_proj`, `out_proj` (all with bias)."""

    heads: int
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape

        def proj(name):
            return Dense(c, dtype=self.dtype, name=name)(x).reshape(b, t, self.heads, c // self.heads)

        out, _ = attn_lib.attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), is_causal=True,
                                    implementation=self.implementation)
        return Dense(c, dtype=self.dtype, name="out_proj")(out.reshape(b, t, c))


class CLIPMLP(nn.Module):
    """`fc1` -> activation -> `fc2`."""

    intermediate_size: int
    hidden_act: Activation
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _ACTIVATIONS[self.hidden_act](Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: `layer_norm1` + `self_attn`, `layer_norm2` + `mlp`."""

    heads: int
    intermediate_size: int
    hidden_act: Activation
    eps: float
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CLIPAttention(self.heads, self.implementation, self.dtype, name="self_attn")(
            _layer_norm(self.eps, self.dtype, "layer_norm1")(x))
        h = _layer_norm(self.eps, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """`layers_0 .. layers_{n-1}`; returns every layer's output."""

    num_layers: int
    heads: int
    intermediate_size: int
    hidden_act: Activation
    eps: float
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32
    remat: Remat = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs = []
        layer_cls = remat_block(CLIPEncoderLayer, self.remat)
        for i in range(self.num_layers):
            x = layer_cls(self.heads, self.intermediate_size, self.hidden_act, self.eps,
                          self.implementation, self.dtype, name=f"layers_{i}")(x)
            outs.append(x)
        return outs


class CLIPTextEmbeddings(nn.Module):
    """`token_embedding` + `position_embedding` (positions `0..T-1`)."""

    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        t = input_ids.shape[-1]
        if t > self.max_position_embeddings:
            raise ValueError(f"CLIP text: {t} tokens exceed max_position_embeddings={self.max_position_embeddings}")
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(t))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    """`embeddings`, `encoder`, `final_layer_norm`; returns (last_hidden_state, eos state, hidden states)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    heads: int
    max_position_embeddings: int
    hidden_act: Activation
    eps: float
    eos_token_id: int
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32
    remat: Remat = "none"

    @nn.compact
    def __call__(self, input_ids: jax.Array):
        x = CLIPTextEmbeddings(self.vocab_size, self.max_position_embeddings, self.hidden_size, self.dtype,
                               name="embeddings")(input_ids)
        outs = CLIPEncoder(self.num_layers, self.heads, self.intermediate_size, self.hidden_act, self.eps,
                           self.implementation, self.dtype, self.remat, name="encoder")(x)
        last = _layer_norm(self.eps, self.dtype, "final_layer_norm")(outs[-1])
        eos = eos_positions(input_ids, self.eos_token_id)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return last, pooled, (x, *outs)


class CLIPTextModel(nn.Module):
    """transformers `CLIPTextModel`, or `CLIPTextModelWithProjection` when `projection_dim` is set.

    `implementation="explicit"` forms the attention matrices (reference path). `remat` is what each
    encoder layer keeps for the backward pass (`models.remat`).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32
    remat: Remat = "none"

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False) -> dict[str, Any]:
        lora.check_collection(self)
        checks.array("CLIPTextModel", "input_ids", input_ids, ndim=2, layout="[B, T] token ids")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CLIPTextModel: input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: input_ids has {input_ids.shape[1]} tokens, more than the model's "
                             f"{self.max_position_embeddings} positions")
        last, pooled, hidden = CLIPTextTransformer(
            self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
            self.num_attention_heads, self.max_position_embeddings, self.hidden_act, self.layer_norm_eps,
            self.eos_token_id, self.implementation, self.dtype, self.remat, name="text_model")(input_ids)
        if self.projection_dim is not None:
            pooled = Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        out: dict[str, Any] = {"last_hidden_state": last, "pooled": pooled}
        if output_hidden_states:
            out["hidden_states"] = hidden
        return out
