"""The training data loader: host batches from a source, forever, with a checkpointable state.

Axes: B = global_batch_size // process_count examples per host batch; the rest as the source's
examples (`imagefolder`, `records`, `synthetic`, `shapes`).

Pipeline (grain's dataset API): source -> this host's slice of the index space
(`process_index::process_count`: hosts read disjoint rows and together every row) -> shuffle,
reseeded every epoch from `seed` -> repeat forever -> read (threads; with `workers > 0` in that
many processes, `mp_prefetch`) -> drop and count bad rows -> stack B examples.

The last two steps run in the trainer's process, in `BatchIterator`, so its state (grain's state
of everything before it, plus the count of skipped rows) restores exactly: the batch after a
restore is the batch that came next when the state was taken, with `workers` 0 or more.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from ctcal_jax import text
from ctcal_jax.data import bad_rows
from ctcal_jax.data.imagefolder import ImageFolderSource
from ctcal_jax.data.records import RecordsSource
from ctcal_jax.data.shapes import ShapesSource
from ctcal_jax.data.synthetic import SyntheticSource

KINDS = ("synthetic", "imagefolder", "records", "shapes")
IMAGE_KINDS = ("imagefolder", "shapes")  # batches carry `images`: the step needs the VAE


def default_config() -> ml_collections.ConfigDict:
    """The data keys of a training config (`config.data = data.default_config()`).

    - `kind`: "synthetic" | "imagefolder" | "records" | "shapes" (the rendered shapes world).
    - `path`: the image folder or the prepared folder.
    - `resolution`: pixels; synthetic latents are `resolution // 8` square with `latent_channels`;
      shapes scenes are drawn on a `resolution` canvas (32 or 64).
    - `max_nouns`, `include_adjectives`, `tagger`: noun selection (`nouns.prepare_batch`); `tagger` is
      "stanza" or a picklable callable (it runs in the worker processes).
    - `on_bad_row`: "skip" (count them) or "fail" (`bad_rows`).
    - `workers`: grain worker processes reading examples (0: threads of the trainer's process).
    - `prompts`: synthetic only, a tuple of `(prompt, tuple of nouns)`.
    - `rows`, `split`, `world_seed`: shapes only: rows per epoch, "train" | "validation" | "test"
      (`shapes.SPLITS`), and the seed of the scenes (row i is the same scene for the same seed).
    """
    return ml_collections.ConfigDict({
        "kind": "synthetic",
        "path": "",
        "resolution": 512,
        "latent_channels": 4,
        "max_nouns": 16,
        "include_adjectives": False,
        # `object`: a config may set a callable as well as the string "stanza".
        "tagger": config_dict.FieldReference("stanza", field_type=object),
        "on_bad_row": "skip",
        "workers": 0,
        "prompts": (),
        "rows": 10_000,
        "split": "train",
        "world_seed": 0,
    })


def open_source(data_config: ml_collections.ConfigDict, encoders: text.PromptEncoders) -> Any:
    """The random-access source `data_config.kind` names (module docstring)."""
    c = data_config
    if c.kind == "synthetic":
        return SyntheticSource(c.prompts, encoders, latent_size=c.resolution // 8, latent_channels=c.latent_channels,
                               max_nouns=c.max_nouns)
    if c.kind == "imagefolder":
        return ImageFolderSource(c.path, encoders, resolution=c.resolution, max_nouns=c.max_nouns,
                                 include_adjectives=c.include_adjectives, tagger=c.tagger, on_bad_row=c.on_bad_row)
    if c.kind == "records":
        return RecordsSource(c.path, family=encoders.family, resolution=c.resolution, max_nouns=c.max_nouns)
    if c.kind == "shapes":
        return ShapesSource(encoders, split=c.split, rows=c.rows, resolution=c.resolution, max_nouns=c.max_nouns,
                            seed=c.world_seed)
    raise ValueError(f"data.kind={c.kind!r}: expected one of {KINDS}")


class BatchIterator(grain.DatasetIterator):
    """Host batches of `batch_size` examples; bad rows dropped and counted in `skipped_rows`.

    A `grain.DatasetIterator`: `get_state()`/`set_state()` (a JSON-able dict) and orbax's
    `grain.checkpoint.CheckpointSave/CheckpointRestore` save and restore it, the count included.
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, rows_per_epoch: int):
        super().__init__(parent)
        self.batch_size = batch_size
        self.rows_per_epoch = rows_per_epoch
        self.skipped_rows = 0

    def __next__(self) -> dict[str, Any]:
        examples: list[dict[str, Any]] = []
        skipped_in_a_row = 0
        while len(examples) < self.batch_size:
            example = next(self._parent)
            if bad_rows.is_skipped(example):
                self.skipped_rows += 1
                skipped_in_a_row += 1
                logging.log_first_n(logging.WARNING, "skipping a bad row: %s", 20, example[bad_rows.SKIPPED])
                # Without this a data set whose rows all turn out bad would spin forever.
                if skipped_in_a_row > self.rows_per_epoch:
                    raise ValueError(f"a whole epoch ({self.rows_per_epoch} rows on this host) was bad rows; "
                                     f"last: {example[bad_rows.SKIPPED]}")
                continue
            skipped_in_a_row = 0
            examples.append(example)
        return jax.tree.map(lambda *xs: np.stack(xs), *examples)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped_rows": self.skipped_rows}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.skipped_rows = int(state["skipped_rows"])


def make_loader(
    data_config: ml_collections.ConfigDict,
    encoders: text.PromptEncoders,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """An endless iterator of this host's batches (module docstring).

    Args:
      data_config: `default_config()`'s keys.
      encoders: the pipeline's text side (tokenizers, family, max_lengths; models are not used).
      global_batch_size: examples per step over all hosts; a multiple of `process_count`.
      seed: shuffle seed (each epoch is shuffled differently, deterministically).
      process_index, process_count: this host's slice of the data; default `jax.process_index()` and
        `jax.process_count()`.

    Returns a `BatchIterator`: `next(it)` is a dict of numpy arrays with leading axis
    `global_batch_size // process_count` (`input_ids` stays a dict of arrays); `it.skipped_rows`
    counts the bad rows this host has dropped; `it.get_state()`/`it.set_state()` checkpoint it.
    Close it (`it.close()`) to stop worker processes early.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of process_count {process_count}")
    batch_size = global_batch_size // process_count
    source = open_source(data_config, encoders)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"{source!r} has fewer rows than the {process_count} hosts reading it")
    rows_per_epoch = len(ds)
    ds = ds.shuffle(seed=seed).repeat(None)
    # A small read-ahead: examples are images or latents, not tokens; grain's default buffer is 500.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=2 * batch_size))
    if data_config.workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.workers,
                                                         per_worker_buffer_size=2))
    return BatchIterator(iter(it), batch_size, rows_per_epoch)
