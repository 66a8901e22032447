"""T5 encoder (transformers `T5EncoderModel`), as SD3 uses it for its third text stream.

Axes: B batch, T tokens, C `d_model`, N heads, D `d_kv`, F `d_ff`.
- `input_ids` `[B, T]` int -> dict with `"last_hidden_state"` `[B, T, C]` (after the final RMS norm)
  and, when asked, `"hidden_states"`: `num_layers + 1` arrays `[B, T, C]`, the embeddings then each
  block's output, the last one replaced by `last_hidden_state` (transformers' convention for T5).
- Attention is bidirectional, unscaled (T5 folds the scale into its weights), with a learned bias per
  (relative-position bucket, head) that block 0 owns and every block reuses. No padding mask: SD3
  runs T5 on all `max_sequence_length` positions, padding included.

Names mirror transformers module paths with list indices joined by `_`:
`encoder/block_0/layer_0/SelfAttention/q` is `encoder.block.0.layer.0.SelfAttention.q`; the token
table is `shared` (transformers ties `encoder.embed_tokens` to it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ctcal_jax import attention as attn_lib
from ctcal_jax import checks, lora
from ctcal_jax.lora import Dense
from ctcal_jax.models.remat import Remat, block as remat_block

Activation = Literal["relu", "gelu_new", "gelu"]

_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """Mesh-TensorFlow's bucketing of `key − query` offsets, bidirectional (transformers
    `T5Attention._relative_position_bucket` for an encoder).

    Each direction gets half the buckets: exact offsets `0 .. max_exact−1`, then log-spaced bins up to
    `max_distance`, beyond which all offsets share the direction's last bucket. Computed on the host
    in float32, the precision transformers uses, so the bin edges round the same way.
    """
    rel = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    max_exact = half // 2
    direction = (rel > 0) * half
    rel = np.abs(rel)
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + np.where(is_small, 0, scaled).astype(np.int64), half - 1)
    return direction + np.where(is_small, rel, large)


@dataclasses.dataclass(frozen=True)
class T5Settings:
    """What every block of one encoder shares (a plain value, so each layer carries it as one field)."""

    heads: int
    d_kv: int
    d_ff: int
    num_buckets: int
    max_distance: int
    eps: float
    act: Activation
    gated: bool
    implementation: attn_lib.Implementation
    dtype: Any


def _rms_norm(s: T5Settings, name: str) -> nn.RMSNorm:
    """T5's `layer_norm`: scale only, no mean subtraction; statistics in float32."""
    return nn.RMSNorm(epsilon=s.eps, dtype=s.dtype, name=name)


class T5Attention(nn.Module):
    """`q`, `k`, `v`, `o` (no bias); block 0 also owns `relative_attention_bias` `[buckets, N]`.

    Returns `(out [B, T, C], position_bias [1, N, T, T])`.
    """

    s: T5Settings
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None):
        s = self.s
        b, t, c = x.shape
        inner = s.heads * s.d_kv

        def proj(name):
            return Dense(inner, use_bias=False, dtype=s.dtype, name=name)(x).reshape(b, t, s.heads, s.d_kv)

        if self.has_relative_attention_bias:
            offsets = np.arange(t)[None, :] - np.arange(t)[:, None]  # key − query, [T, T]
            buckets = relative_position_bucket(offsets, s.num_buckets, s.max_distance)
            table = nn.Embed(s.num_buckets, s.heads, dtype=s.dtype, name="relative_attention_bias")
            position_bias = table(jnp.asarray(buckets, jnp.int32)).transpose(2, 0, 1)[None]
        out, _ = attn_lib.attention(proj("q"), proj("k"), proj("v"), scale=1.0, bias=position_bias,
                                    implementation=s.implementation)
        return Dense(c, use_bias=False, dtype=s.dtype, name="o")(out.reshape(b, t, inner)), position_bias


class T5LayerSelfAttention(nn.Module):
    """`layer_norm` + `SelfAttention`, residual."""

    s: T5Settings
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None):
        h = _rms_norm(self.s, "layer_norm")(x)
        h, position_bias = T5Attention(self.s, self.has_relative_attention_bias, name="SelfAttention")(h, position_bias)
        return x + h, position_bias


class T5DenseReluDense(nn.Module):
    """Gated (`wi_0` activated × `wi_1`) or plain (`wi` activated) feed-forward, then `wo`."""

    s: T5Settings

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.s

        def dense(features, name):
            return Dense(features, use_bias=False, dtype=s.dtype, name=name)

        act = _ACTIVATIONS[s.act]
        h = act(dense(s.d_ff, "wi_0")(x)) * dense(s.d_ff, "wi_1")(x) if s.gated else act(dense(s.d_ff, "wi")(x))
        return dense(x.shape[-1], "wo")(h)


class T5LayerFF(nn.Module):
    """`layer_norm` + `DenseReluDense`, residual."""

    s: T5Settings

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x + T5DenseReluDense(self.s, name="DenseReluDense")(_rms_norm(self.s, "layer_norm")(x))


class T5Block(nn.Module):
    """`layer_0` (self-attention) then `layer_1` (feed-forward)."""

    s: T5Settings
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None):
        x, position_bias = T5LayerSelfAttention(self.s, self.has_relative_attention_bias, name="layer_0")(x, position_bias)
        return T5LayerFF(self.s, name="layer_1")(x), position_bias


class T5Stack(nn.Module):
    """`block_0 .. block_{n-1}`, `final_layer_norm`; returns (last_hidden_state, hidden states)."""

    s: T5Settings
    num_layers: int
    remat: Remat = "none"

    @nn.compact
    def __call__(self, x: jax.Array):
        hidden = [x]
        position_bias = None
        block_cls = remat_block(T5Block, self.remat)
        for i in range(self.num_layers):
            x, position_bias = block_cls(self.s, i == 0, name=f"block_{i}")(x, position_bias)
            hidden.append(x)
        last = _rms_norm(self.s, "final_layer_norm")(x)
        return last, (*hidden[:-1], last)


class T5EncoderModel(nn.Module):
    """transformers `T5EncoderModel` (T5 v1.1 / SD3: `feed_forward_proj="gated-gelu"`).

    `implementation="explicit"` forms the attention matrices (reference path). `remat` is what each
    block keeps for the backward pass (`models.remat`).
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: Activation = "gelu_new"
    is_gated_act: bool = True
    implementation: attn_lib.Implementation = "auto"
    dtype: Any = jnp.float32
    remat: Remat = "none"

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False) -> dict[str, Any]:
        lora.check_collection(self)
        checks.array("T5EncoderModel", "input_ids", input_ids, ndim=2, layout="[B, T] token ids")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"T5EncoderModel: input_ids must be integer token ids, got dtype {input_ids.dtype}")
        s = T5Settings(self.num_heads, self.d_kv, self.d_ff, self.relative_attention_num_buckets,
                       self.relative_attention_max_distance, self.layer_norm_epsilon, self.dense_act_fn,
                       self.is_gated_act, self.implementation, self.dtype)
        x = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, name="shared")(input_ids)
        last, hidden = T5Stack(s, self.num_layers, self.remat, name="encoder")(x)
        out: dict[str, Any] = {"last_hidden_state": last}
        if output_hidden_states:
            out["hidden_states"] = hidden
        return out
