"""Prompt encoding: exactly the text embeddings diffusers' pipelines feed the denoiser.

Axes: B prompts, T tokens, C widths. Components are named as in a diffusers pipeline folder
(`text_encoder`, `text_encoder_2`, `text_encoder_3`); every per-encoder dict below uses those keys.
T5 is `text_encoder_3` in SD3 folders and `text_encoder_2` in FLUX.1 folders (`T5_COMPONENT`).

- SD 1.x / 2.x (`StableDiffusionPipeline.encode_prompt`, clip_skip=None): the CLIP text model's
  `last_hidden_state` (after `final_layer_norm`) on 77 tokens -> `prompt_embeds [B, 77, C]`.
- SD3 (`StableDiffusion3Pipeline.encode_prompt`): CLIP-L and CLIP-G penultimate hidden states
  (`hidden_states[-2]`, no final norm) concatenated on features and zero-padded to the T5 width, then
  T5's `last_hidden_state` on `max_sequence_length` (256) tokens appended on the token axis ->
  `prompt_embeds [B, 77 + 256, C_t5]`; the two CLIP pooled projections concatenated ->
  `pooled_prompt_embeds [B, P_l + P_g]`. A pipeline saved without T5 gets zeros for that stream.
- FLUX.1 (`FluxPipeline.encode_prompt`): CLIP-L's `pooler_output` on 77 tokens ->
  `pooled_prompt_embeds [B, C_clip]`; T5's `last_hidden_state` on `max_sequence_length` (512)
  tokens -> `prompt_embeds [B, T, C_t5]`; the text positions (`txt_ids`) are zeros, the
  transformer's default. The same prompt feeds both encoders (diffusers' `prompt_2=None`).
- Classifier-free guidance's unconditional embeddings are those of the empty prompt `""`
  (`negative_prompt=None` or `""` in diffusers): `encode_text(encoders, params, [""] * B)`. (FLUX.1's
  true CFG encodes its negative prompts the same way.)

Tokenizing runs on the host (`tokenize`, `tokenize_prompts`: int arrays and character offsets for
noun selection); `encode_prompts` is pure and jittable, so a train step can run (and LoRA-train) the
CLIP encoders inside jit, while the frozen T5 stream may be precomputed with `t5_embeddings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Family = Literal["sd", "sd3", "flux"]

# Encoder component -> the tokenizer component that feeds it.
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
# The T5 encoder's component in each family's pipeline folder.
T5_COMPONENT = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}


@dataclasses.dataclass(frozen=True, eq=False)
class PromptEncoders:
    """The text side of one pipeline, keyed by encoder component name.

    `conversion.load_encoders(pipeline_folder)` reads one from a diffusers folder.

    Attributes:
      family: `"sd"` (one CLIP), `"sd3"` (CLIP-L, CLIP-G, T5) or `"flux"` (CLIP-L, T5).
      tokenizers: transformers tokenizers.
      models: Flax text encoders; T5 (`T5_COMPONENT`) is absent when the pipeline has no T5 or it
        was not loaded.
      max_lengths: tokens per encoder (CLIP: the first tokenizer's `model_max_length`, as diffusers;
        T5: `max_sequence_length`).
      joint_attention_dim: SD3 only, the width of the zero T5 stream used when there is no T5.
    """

    family: Family
    tokenizers: dict[str, Any]
    models: dict[str, nn.Module]
    max_lengths: dict[str, int]
    joint_attention_dim: int | None = None


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Pad to and truncate at `max_length` with special tokens, as the pipelines call the tokenizer.

    Returns `input_ids` int32 `[B, max_length]` and `offsets` int32 `[B, max_length, 2]`: each token's
    `[start, end)` characters in its prompt (`(0, 0)` for special and padding tokens).
    """
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int32).reshape(*ids.shape, 2)
    return {"input_ids": ids, "offsets": offsets}


def tokenize_prompts(encoders: PromptEncoders, prompts: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """`tokenize` for every tokenizer of the pipeline: `{component: {"input_ids", "offsets"}}`."""
    return {c: tokenize(tok, prompts, encoders.max_lengths[c]) for c, tok in encoders.tokenizers.items()}


def _variables(params: dict[str, Any], lora: dict[str, Any] | None, component: str) -> dict[str, Any]:
    """`{"params": ...}` of one encoder, with `{"lora": ...}` when `lora` has adapters for it."""
    if lora and lora.get(component) is not None:
        return {"params": params[component], "lora": lora[component]}
    return {"params": params[component]}


def t5_embeddings(encoders: PromptEncoders, params: dict[str, Any], input_ids: dict[str, jax.Array]) -> jax.Array:
    """The T5 stream `[B, T_t5, C_t5]` (SD3, FLUX.1): T5's `last_hidden_state`; for SD3 without T5, zeros."""
    component = T5_COMPONENT[encoders.family]
    if component not in encoders.models:
        if encoders.family == "flux":
            raise ValueError("FLUX.1's prompt embeddings are T5's (text_encoder_2), which is not loaded: "
                             "load it, or pass precomputed t5_embeds")
        batch = next(iter(input_ids.values())).shape[0]
        return jnp.zeros((batch, encoders.max_lengths[component], encoders.joint_attention_dim))
    model = encoders.models[component]
    return model.apply({"params": params[component]}, input_ids[component])["last_hidden_state"]


def encode_prompts(
    encoders: PromptEncoders,
    params: dict[str, Any],
    input_ids: dict[str, jax.Array],
    t5_embeds: jax.Array | None = None,
    *,
    lora: dict[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """Token ids -> the denoiser's text inputs. Pure; jit it with `encoders` closed over.

    Args:
      params: `{component: params}` of the text encoders.
      input_ids: `{component: [B, T] int}`, from `tokenize_prompts`.
      t5_embeds: SD3's or FLUX.1's precomputed T5 stream (`t5_embeddings`); computed here when `None`.
      lora: optional `{component: LoRA tree}` (`ctcal_jax.lora`), applied unmerged.

    Returns `{"prompt_embeds"}` for SD, `{"prompt_embeds", "pooled_prompt_embeds"}` for SD3 and
    FLUX.1 (module docstring).
    """
    if encoders.family == "sd":
        out = encoders.models["text_encoder"].apply(_variables(params, lora, "text_encoder"),
                                                    input_ids["text_encoder"])
        return {"prompt_embeds": out["last_hidden_state"]}
    if encoders.family == "flux":
        out = encoders.models["text_encoder"].apply(_variables(params, lora, "text_encoder"),
                                                    input_ids["text_encoder"])
        if t5_embeds is None:
            t5_embeds = t5_embeddings(encoders, params, input_ids)
        return {"prompt_embeds": t5_embeds, "pooled_prompt_embeds": out["pooled"]}
    hidden, pooled = [], []
    for c in ("text_encoder", "text_encoder_2"):
        out = encoders.models[c].apply(_variables(params, lora, c), input_ids[c], output_hidden_states=True)
        hidden.append(out["hidden_states"][-2])
        pooled.append(out["pooled"])
    if t5_embeds is None:
        t5_embeds = t5_embeddings(encoders, params, input_ids)
    # torch's F.pad to the T5 width: zeros on the right (a negative pad would crop).
    width = t5_embeds.shape[-1]
    clip = jnp.concatenate(hidden, axis=-1)[..., :width]
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    return {
        "prompt_embeds": jnp.concatenate([clip, t5_embeds.astype(clip.dtype)], axis=1),
        "pooled_prompt_embeds": jnp.concatenate(pooled, axis=-1),
    }


def encode_text(encoders: PromptEncoders, params: dict[str, Any], prompts: Sequence[str], *,
                lora: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """Tokenize and encode in one call (sampling, data preparation); `[""] * B` gives the CFG negatives."""
    tokens = tokenize_prompts(encoders, prompts)
    return encode_prompts(encoders, params, {c: jnp.asarray(t["input_ids"]) for c, t in tokens.items()},
                          lora=lora)
