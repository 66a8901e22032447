"""One training example's text arrays: a row `(prompt, given nouns, reward)` -> the batch keys the
family train steps read (`families/unet.py`, `families/mmdit.py`), without the batch axis.

Axes: T tokens of one text stream (77 for CLIP, 256 for SD3's T5, 512 for FLUX.1's), N nouns (`max_nouns`).

- `input_ids` `{component: int32 [T]}` for every tokenizer of the pipeline (`text.tokenize`).
- SD 1.x/2.x (`family="sd"`): `noun_weights` float32 `[N, 77]`, `token_mask` bool `[77]`.
- SD3 (`family="sd3"`): `noun_weights_clip`/`token_mask_clip` from the CLIP-L tokenizer
  (`text_encoder`), `noun_weights_t5` `[N, 256]`/`token_mask_t5` `[256]` from the T5 tokenizer
  (`text_encoder_3`); all zeros when the pipeline has no T5 (its stream is zeros too).
- FLUX.1 (`family="flux"`): `noun_weights_t5` `[N, 512]`/`token_mask_t5` `[512]` from the T5 tokenizer
  (`text_encoder_2`), FLUX.1's only text stream in the attention (CLIP-L gives the pooled vector).
- `reward` float32 `[]` when the row has one (GORS weight, SPEC §3).

The noun arrays are exactly `nouns.prepare_batch`'s for a batch of one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctcal_jax import nouns, text


def text_side(encoders: text.PromptEncoders) -> text.PromptEncoders:
    """`encoders` without its Flax models: all the data pipeline needs, and cheap to pickle into
    grain's worker processes."""
    return dataclasses.replace(encoders, models={})


def text_example(
    encoders: text.PromptEncoders,
    prompt: str,
    given: Sequence[str] | None = None,
    reward: float | None = None,
    *,
    max_nouns: int = 16,
    include_adjectives: bool = False,
    tagger: nouns.Tagger = "stanza",
) -> dict[str, Any]:
    """The text arrays of one example (module docstring).

    Args:
      encoders: the pipeline's text side; only `family`, `tokenizers` and `max_lengths` are read.
      given: the nouns the data names for this prompt (`nouns.prepare_batch`'s `given=`); then no
        tagger runs.
      reward: the row's reward, if any.
      max_nouns, include_adjectives, tagger: as in `nouns.prepare_batch`.

    Raises ValueError when a given noun is not a word of the prompt (`nouns.given_spans`).
    """
    if given is None:
        # SD3 selects nouns in two token streams: tag the prompt once, not once per tokenizer.
        words = nouns.tag(prompt, tagger)
        tagger = lambda _: words  # noqa: E731
    with _TOKENIZER_LOCK:
        return _text_arrays(encoders, prompt, given, reward, max_nouns, include_adjectives, tagger)


# grain reads examples in several threads, and a transformers tokenizer is not thread-safe: each call
# sets the padding and truncation of its shared Rust backend, so two threads tokenizing at once can
# get each other's lengths. Tokenizing is a small part of an example's cost; it runs one at a time.
_TOKENIZER_LOCK = threading.Lock()


def _text_arrays(encoders: text.PromptEncoders, prompt: str, given: Sequence[str] | None, reward: float | None,
                 max_nouns: int, include_adjectives: bool, tagger: nouns.Tagger) -> dict[str, Any]:
    out: dict[str, Any] = {"input_ids": {
        c: text.tokenize(tok, [prompt], encoders.max_lengths[c])["input_ids"][0]
        for c, tok in encoders.tokenizers.items()}}

    def arrays(component: str) -> tuple[np.ndarray, np.ndarray]:
        a = nouns.prepare_batch([prompt], encoders.tokenizers[component], max_nouns=max_nouns,
                                seq_len=encoders.max_lengths[component], tagger=tagger,
                                include_adjectives=include_adjectives, given=[given])
        return a["noun_weights"][0], a["token_mask"][0]

    if encoders.family == "sd":
        out["noun_weights"], out["token_mask"] = arrays("text_encoder")
    elif encoders.family == "flux":
        out["noun_weights_t5"], out["token_mask_t5"] = arrays(text.T5_COMPONENT["flux"])
    else:
        out["noun_weights_clip"], out["token_mask_clip"] = arrays("text_encoder")
        if "text_encoder_3" in encoders.tokenizers:
            out["noun_weights_t5"], out["token_mask_t5"] = arrays("text_encoder_3")
        else:
            length = encoders.max_lengths["text_encoder_3"]
            out["noun_weights_t5"] = np.zeros((max_nouns, length), np.float32)
            out["token_mask_t5"] = np.zeros((length,), bool)
    if reward is not None:
        out["reward"] = np.asarray(reward, np.float32)
    return out
