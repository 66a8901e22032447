"""Synthetic source: prompts with their nouns and smooth random latents, no files (smoke tests, the demo).

An example: `latents` `[S, S, C]` float32 (S = latent size, C = latent channels), a low-frequency
random field seeded by the row index (so the same row is the same latent in every epoch, on every
host, in every worker), plus the text arrays of the row's prompt with its nouns given
(`examples.text_example`; no tagger runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ctcal_jax import text
from ctcal_jax.data.examples import text_example, text_side


def smooth_latents(seed: int, size: int, channels: int) -> np.ndarray:
    """`[size, size, channels]` float32: 4×4 normal noise up-sampled bicubically, standing in for VAE
    latents (the demo's `synthetic_latents`, one field per seed)."""
    coarse = np.random.RandomState(seed).randn(4, 4, channels).astype(np.float32)
    return np.asarray(jax.image.resize(coarse, (size, size, channels), "bicubic"))


class SyntheticSource:
    """grain random-access source over `(prompt, nouns)` rows (module docstring). Picklable."""

    def __init__(
        self,
        prompts: Sequence[tuple[str, Sequence[str]]],
        encoders: text.PromptEncoders,
        *,
        latent_size: int,
        latent_channels: int = 4,
        max_nouns: int = 16,
    ):
        if not prompts:
            raise ValueError("synthetic data needs prompts: a tuple of (prompt, tuple of nouns)")
        self.rows = tuple((str(p), tuple(n)) for p, n in prompts)
        self.encoders = text_side(encoders)
        self.latent_size, self.latent_channels, self.max_nouns = latent_size, latent_channels, max_nouns

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        prompt, given = self.rows[index]
        return {"latents": smooth_latents(index, self.latent_size, self.latent_channels),
                **text_example(self.encoders, prompt, given, max_nouns=self.max_nouns)}

    def __repr__(self) -> str:
        return f"SyntheticSource({len(self.rows)} prompts, latents {self.latent_size}² × {self.latent_channels})"


# Eight prompts with the nouns the data names for them (compounds are one subject): the demo's data
# and every config's `runlocal` variant.
DEMO_PROMPTS = (
    ("a cat and a dog on a sofa", ("cat", "dog", "sofa")),
    ("a red car next to a traffic light", ("car", "traffic light")),
    ("a giraffe and a zebra in a field", ("giraffe", "zebra", "field")),
    ("a teddy bear on a bed", ("teddy bear", "bed")),
    ("a bowl of apples beside a vase", ("bowl", "apples", "vase")),
    ("a horse in front of a barn", ("horse", "barn")),
    ("a laptop and a cup on a desk", ("laptop", "cup", "desk")),
    ("a boat under a bridge", ("boat", "bridge")),
)
