"""Noun selection for CTCAL (SPEC §5): which prompt words get alignment terms, at which token positions.

Axes: B prompts, N selected words (padded to `max_nouns`), T tokens of one text stream (`seq_len`).

A tagger yields `(word, UPOS, start_char, end_char)`. A selected word maps to every token whose
character span overlaps the word's, so a word split into sub-tokens ("giraffes" -> "gira", "ffes";
T5's bare "▁" boundary piece, whether its offset is the word's first character or the space before
it) or holding punctuation ("hot-dog" -> "hot", "-", "dog") maps to all of its positions, and a
tagger that returns "traffic light" as one word gets one group. Positions index `input_ids` as the text encoder sees
them: CLIP has SOT at 0; T5 has no SOT (for SD3's joint text, add 77 to index the T5 stream).

Tagging runs once, in data preparation. `prepare_batch` turns a batch of prompts into the
fixed-size arrays the train step takes:
- `noun_weights` `[B, N, T]` float32: row i is 1/n_i on the n_i positions of word i, so
  `einsum("bhwt,bnt->bhwn", maps, noun_weights)` is the sub-token mean; all-zero rows are padding.
- `token_mask` `[B, T]` bool: the prompt's real tokens (no SOT, EOT or padding), over which the
  re-weighting softmax runs (SPEC §2).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any, Union

import numpy as np

TaggedWord = tuple[str, str, int, int]  # (word, UPOS, start_char, end_char)
Tagger = Union[str, Callable[[str], Any], Any]  # "stanza", prompt -> words | Document, or a Document
Given = Sequence[Union[str, tuple[int, int]]]  # words of the prompt, or (start, end) character spans

# Spatial nouns tag as NOUN ("on the left side") but name no subject (SPEC §5, our choice).
SPATIAL_NOUNS = frozenset(
    {"top", "bottom", "left", "right", "side", "front", "back", "middle", "center", "centre", "corner", "edge"})

_MISSING_STANZA = (
    "Stanza's English models (processors tokenize,pos) were not found, or are incomplete, in {dir!r}; "
    "this code never downloads them. On a machine with network access run "
    "`python -c 'import stanza; stanza.download(\"en\")'` (stanza {version} writes to {default}, or to "
    "$STANZA_RESOURCES_DIR when set), copy that folder to this machine and set "
    "STANZA_RESOURCES_DIR=/path/to/that/folder (or pass resources_dir=). "
    "Alternatively pass a tagger callable, or the nouns with the data (`given=`)."
)


def _missing_stanza(directory: str) -> str:
    """The message for missing models, naming the folder this stanza downloads to by default
    (`~/.cache/stanza/<version>/resources` since stanza 1.10; `~/stanza_resources` before)."""
    try:
        import stanza
        from stanza.resources import common
    except ImportError:
        return _MISSING_STANZA.format(dir=directory, version="(not installed)",
                                      default="~/.cache/stanza/<version>/resources")
    # common.DEFAULT_MODEL_DIR is $STANZA_RESOURCES_DIR when that was set at import: name the default.
    default = (os.path.join(common.USER_CACHE_DIR, "resources") if hasattr(common, "USER_CACHE_DIR")
               else os.path.expanduser("~/stanza_resources"))
    return _MISSING_STANZA.format(dir=directory, version=stanza.__version__, default=default)


def stanza_pipeline(resources_dir: str | None = None):
    """The English `tokenize,pos` Stanza pipeline (cached) from `resources_dir`, else
    `$STANZA_RESOURCES_DIR`, else Stanza's default folder. Raises `FileNotFoundError` with
    instructions when the models are missing; never downloads."""
    if resources_dir is None:
        resources_dir = os.environ.get("STANZA_RESOURCES_DIR")
    if resources_dir is None:
        from stanza.resources.common import DEFAULT_MODEL_DIR

        resources_dir = DEFAULT_MODEL_DIR
    return _load_stanza(os.path.abspath(resources_dir))


@functools.lru_cache(maxsize=2)
def _load_stanza(directory: str):
    found = os.path.isfile(os.path.join(directory, "resources.json")) and os.path.isdir(os.path.join(directory, "en"))
    if not found:
        raise FileNotFoundError(_missing_stanza(directory))
    import stanza

    try:
        return stanza.Pipeline("en", processors="tokenize,pos", dir=directory, download_method=None, verbose=False)
    except (FileNotFoundError, ValueError) as e:  # stanza: missing files, or resources.json without "en"
        raise FileNotFoundError(_missing_stanza(directory)) from e


def document_words(doc: Any) -> list[TaggedWord]:
    """`(text, upos, start_char, end_char)` of every word of a Stanza `Document`, in order.

    Words inside a multi-word token carry no offsets of their own; they take the token's.
    """
    words = []
    for sentence in doc.sentences:
        for word in sentence.words:
            start, end = word.start_char, word.end_char
            if start is None:
                start, end = word.parent.start_char, word.parent.end_char
            if start is None:
                raise ValueError(f"Stanza word {word.text!r} has no character offsets (start_char/end_char)")
            words.append((word.text, word.upos, int(start), int(end)))
    return words


def tag(prompt: str, tagger: Tagger = "stanza") -> list[TaggedWord]:
    """Tagged words of `prompt`: `tagger` is "stanza", a Stanza `Document` of the prompt, or a
    callable returning either a `Document` or a list of `(word, upos, start_char, end_char)`."""
    if isinstance(tagger, str):
        if tagger != "stanza":
            raise ValueError(f"tagger={tagger!r}: expected 'stanza', a callable or a stanza Document")
        tagger = stanza_pipeline()
    out = tagger if hasattr(tagger, "sentences") else tagger(prompt)
    if hasattr(out, "sentences"):
        return document_words(out)
    return [(str(w), str(u), int(s), int(e)) for w, u, s, e in out]


def is_blacklisted(word: str, blacklist: Collection[str]) -> bool:
    """Case-insensitive membership, plurals included ("corners", "sides")."""
    w, lowered = word.lower(), {b.lower() for b in blacklist}
    return w in lowered or (w.endswith("s") and w[:-1] in lowered)


def select_spans(
    words: Sequence[TaggedWord],
    include_adjectives: bool = False,
    blacklist: Collection[str] = SPATIAL_NOUNS,
    merge_compounds: bool = True,
    prompt: str | None = None,
) -> list[tuple[int, int]]:
    """Character spans of the words CTCAL aligns: UPOS NOUN and PROPN (and ADJ when asked),
    minus the blacklist, in order.

    With `merge_compounds`, a run of consecutive selected nouns ("traffic light", "teddy bear",
    "fire hydrant", "New York") is one subject: one span from the first word's start to the last
    word's end, so one group holding all their sub-tokens (SPEC §5). Nouns are consecutive when
    nothing but whitespace separates them in `prompt` (without `prompt`: at most one character).
    """
    nouns = {"NOUN", "PROPN"}
    keep = nouns | ({"ADJ"} if include_adjectives else set())
    spans: list[tuple[int, int]] = []
    previous_noun = False
    for w, upos, s, e in words:
        selected = upos in keep and not is_blacklisted(w, blacklist)
        is_noun = selected and upos in nouns
        if is_noun and previous_noun and merge_compounds and _only_space(prompt, spans[-1][1], s):
            spans[-1] = (spans[-1][0], e)
        elif selected:
            spans.append((s, e))
        previous_noun = is_noun
    return spans


def _only_space(prompt: str | None, start: int, end: int) -> bool:
    if prompt is None:
        return end - start <= 1
    return prompt[start:end].isspace()


def given_spans(prompt: str, given: Given) -> list[tuple[int, int]]:
    """Character spans of nouns the data names: `(start, end)` pairs, or words found in the prompt
    as whole words (case-insensitive; a word listed twice takes its next occurrence). Sorted."""
    spans: list[tuple[int, int]] = []
    if isinstance(given, str):
        raise ValueError(f"given={given!r}: expected a list of words or (start, end) spans, not one string")
    for item in given:
        if isinstance(item, str):
            if not item.strip():
                raise ValueError(f"given noun {item!r} is empty (prompt {_short(prompt)!r})")
            pattern = r"(?<!\w)" + re.escape(item.strip()) + r"(?!\w)"
            found = [m.span() for m in re.finditer(pattern, prompt, re.IGNORECASE) if m.span() not in spans]
            if not found:
                raise ValueError(f"given noun {item!r} does not occur (again) as a word in the prompt "
                                 f"{_short(prompt)!r}")
            spans.append(found[0])
        else:
            if (not isinstance(item, (tuple, list)) or len(item) != 2
                    or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in item)):
                raise ValueError(f"given item {str(item)[:40]}: expected a word or a (start, end) pair of ints")
            start, end = (int(v) for v in item)
            if not 0 <= start < end <= len(prompt):
                raise ValueError(f"given span {(start, end)} is outside the prompt {_short(prompt)!r} "
                                 f"({len(prompt)} characters)")
            spans.append((start, end))
    return sorted(spans)


def _encode(prompt: str, tokenizer: Any, max_length: int | None, **kwargs) -> Any:
    """`tokenizer(prompt)` truncated to `max_length`, else to `model_max_length` when the tokenizer
    sets a real one (transformers' "unset" value is 1e30)."""
    limit = max_length or tokenizer.model_max_length
    if limit < 2**31:
        kwargs.update(truncation=True, max_length=limit)
    try:
        return tokenizer(prompt, **kwargs)
    except NotImplementedError as e:
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets; use a fast (tokenizers) one") from e


def span_positions(
    prompt: str, tokenizer: Any, spans: Sequence[tuple[int, int]], max_length: int | None = None
) -> list[list[int]]:
    """Token positions overlapping each character span; spans with no token left after truncation
    to `max_length` (default `tokenizer.model_max_length`) are dropped, with a `UserWarning` naming
    the prompt and the words (also for words truncation cuts in part, or the tokenizer drops)."""
    limit = max_length or tokenizer.model_max_length
    enc = _encode(prompt, tokenizer, max_length, return_offsets_mapping=True)
    # A limit below the special tokens' count is exceeded by the tokenizer: positions stay inside it.
    offsets = [_onto_next_word(prompt, int(ts), int(te)) for ts, te in enc["offset_mapping"]][:limit]
    groups = [[i for i, (ts, te) in enumerate(offsets) if ts < end and te > start] for start, end in spans]
    _warn_dropped(prompt, spans, groups, offsets, limit)
    return [g for g in groups if g]


def _warn_dropped(prompt: str, spans: Sequence[tuple[int, int]], groups: Sequence[Sequence[int]],
                  offsets: Sequence[tuple[int, int]], limit: int) -> None:
    """A `UserWarning` naming the prompt and the selected words that lost tokens: cut by truncation
    (wholly: dropped; in part: fewer positions), or given no token at all by the tokenizer."""
    covered = max((te for ts, te in offsets if te > ts), default=0)  # end of the last token kept
    truncated = len(offsets) >= limit
    is_cut = [truncated and e > covered and not prompt[covered:e].isspace() for s, e in spans]
    cut = [prompt[s:e] for (s, e), c in zip(spans, is_cut) if c]
    empty = [prompt[s:e] for (s, e), g, c in zip(spans, groups, is_cut) if not g and not c]
    short = _short(prompt)
    if cut:
        warnings.warn(f"nouns: the prompt {short!r} is truncated to {limit} tokens; selected words past the cut "
                      f"are dropped or lose their last tokens: {cut}", UserWarning, stacklevel=3)
    if empty:
        warnings.warn(f"nouns: the tokenizer gives no token to the selected words {empty} of the prompt {short!r}; "
                      "they are dropped", UserWarning, stacklevel=3)


def _short(prompt: str) -> str:
    """A prompt cut to 80 characters for messages."""
    return prompt if len(prompt) <= 80 else prompt[:77] + "..."


def _onto_next_word(prompt: str, start: int, end: int) -> tuple[int, int]:
    """A token covering only whitespace (SentencePiece's bare "▁" when the pre-tokenizer maps it to
    the space before a word) is moved onto the next word's first character, so it joins that word."""
    if start == end or not prompt[start:end].isspace():
        return start, end
    rest = prompt[end:]
    nxt = end + len(rest) - len(rest.lstrip())
    return nxt, nxt + 1


def noun_token_groups(
    prompt: str,
    tokenizer: Any,
    tagger: Tagger = "stanza",
    include_adjectives: bool = False,
    *,
    blacklist: Collection[str] = SPATIAL_NOUNS,
    given: Given | None = None,
    max_length: int | None = None,
    merge_compounds: bool = True,
) -> list[list[int]]:
    """Token positions (SOT = 0) of each selected word of `prompt`, in prompt order.

    Args:
      tokenizer: a fast Hugging Face tokenizer (CLIP BPE, T5 SentencePiece, ...): offsets are needed.
      tagger: "stanza", a Stanza `Document` of this prompt, or a callable prompt -> `Document` or
        list of `(word, upos, start_char, end_char)`.
      include_adjectives: select UPOS ADJ as well (paper Table 6).
      blacklist: words never selected (case-insensitive, plurals too); `frozenset()` disables it.
      given: nouns the data carries (words or character spans); then no tagger runs and the
        blacklist does not apply (the data chose them).
      max_length: token budget of the text stream (default `tokenizer.model_max_length`).
      merge_compounds: consecutive nouns form one subject ("traffic light"); see `select_spans`.
    """
    if given is not None:
        spans = given_spans(prompt, given)
    else:
        spans = select_spans(tag(prompt, tagger), include_adjectives, blacklist, merge_compounds, prompt)
    return span_positions(prompt, tokenizer, spans, max_length)


def group_weights(groups: Sequence[Sequence[int]], max_nouns: int, seq_len: int) -> np.ndarray:
    """`[max_nouns, seq_len]` float32 sub-token-mean weights (module docstring). Words past
    `max_nouns` are left out (the first ones in prompt order are kept)."""
    w = np.zeros((max_nouns, seq_len), np.float32)
    for i, group in enumerate(groups[:max_nouns]):
        w[i, list(group)] = 1.0 / len(group)
    return w


def real_token_mask(prompt: str, tokenizer: Any, seq_len: int) -> np.ndarray:
    """`[seq_len]` bool: positions holding the prompt's own tokens (not special, not padding)."""
    enc = _encode(prompt, tokenizer, seq_len, padding="max_length", return_special_tokens_mask=True)
    return np.asarray(enc["attention_mask"], bool) & ~np.asarray(enc["special_tokens_mask"], bool)


def prepare_batch(
    prompts: Sequence[str],
    tokenizer: Any,
    *,
    max_nouns: int = 16,
    seq_len: int | None = None,
    tagger: Tagger = "stanza",
    include_adjectives: bool = False,
    blacklist: Collection[str] = SPATIAL_NOUNS,
    given: Sequence[Given | None] | None = None,
    merge_compounds: bool = True,
) -> dict[str, np.ndarray]:
    """`{"noun_weights": [B, N, T] float32, "token_mask": [B, T] bool}` for a batch of prompts.

    `tagger="stanza"` tags the whole batch in one pipeline call; `given[b]`, when not None,
    supplies prompt b's nouns instead. `seq_len` defaults to `tokenizer.model_max_length`.
    """
    seq_len = seq_len or tokenizer.model_max_length
    if seq_len >= 2**31:
        raise ValueError(f"{type(tokenizer).__name__} sets no model_max_length: pass seq_len")
    given = list(given) if given is not None else [None] * len(prompts)
    taggers: list[Tagger] = [tagger] * len(prompts)
    if isinstance(tagger, str) and tagger == "stanza":
        todo = [i for i, g in enumerate(given) if g is None]
        if todo:
            import stanza

            docs = stanza_pipeline()([stanza.Document([], text=prompts[i]) for i in todo])
            for i, doc in zip(todo, docs):
                taggers[i] = doc
    weights, masks = [], []
    for prompt, t, g in zip(prompts, taggers, given):
        groups = noun_token_groups(prompt, tokenizer, t, include_adjectives, blacklist=blacklist, given=g,
                                   max_length=seq_len, merge_compounds=merge_compounds)
        weights.append(group_weights(groups, max_nouns, seq_len))
        masks.append(real_token_mask(prompt, tokenizer, seq_len))
    return {"noun_weights": np.stack(weights), "token_mask": np.stack(masks)}
