"""The real CLIP BPE tokenizer, built offline from OpenAI's vocabulary file shipped in the package.

Pipeline folders carry their own tokenizers (`conversion.load_encoders` reads them); this one is for
offline work without a pipeline folder: the demo, tests, data preparation on machines without hub
access. Its 49408 ids equal those of `openai/clip-vit-large-patch14`'s tokenizer.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

VOCAB_FILE = Path(__file__).parent / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A transformers `CLIPTokenizer` with the real vocabulary and merges.

    `pad_token="<|endoftext|>"` is SD 1.x's tokenizer; SD 2.x and SD3's CLIP-G pad with `"!"`.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                         pad_token=pad_token)


@functools.cache
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    lines = gzip.open(VOCAB_FILE).read().decode("utf-8").split("\n")
    merges = tuple(tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return tuple((t, i) for i, t in enumerate(tokens)), merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
