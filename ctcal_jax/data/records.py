"""Prepared records: ArrayRecord shards of ready examples, written by `python -m ctcal_jax.prepare`.

Layout of a prepared folder DIR:
- `DIR/shard-00000.array_record`, `shard-00001...`: one record per example, the example's dict of
  numpy arrays serialised with `flax.serialization.msgpack_serialize` (no pickle: reading a data
  set runs no code from it).
- `DIR/prepared.json`: `family` ("sd" | "sd3" | "flux"), `resolution`, `max_nouns`, `keys` and `shapes`/
  `dtypes` of an example, `shards` (`file`, `rows` of metadata it covered, `records` written),
  `rows`, `records`, `skipped_rows`, and the VAE's `scaling_factor`/`shift_factor` applied.

An example: `latents` `[h, w, C]` float32, already `(z − shift) · scale` (what the denoiser sees),
the text arrays (`examples`), for SD3 and FLUX.1 `t5_embeds` `[256 | 512, C_t5]` (T5 is frozen: computed once), and
`reward` `[]` when the data has rewards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grain
from flax import serialization

MANIFEST = "prepared.json"
# group_size:1 makes every record its own chunk: random access reads one record, not a group.
WRITER_OPTIONS = "group_size:1"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


def serialize(example: dict[str, Any]) -> bytes:
    return serialization.msgpack_serialize(example)


def deserialize(record: bytes) -> dict[str, Any]:
    return serialization.msgpack_restore(record)


def write_shard(path: str | Path, examples: Iterable[dict[str, Any]]) -> int:
    """Write `examples` to the ArrayRecord file `path`; returns how many were written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
    n = 0
    try:
        for example in examples:
            writer.write(serialize(example))
            n += 1
    finally:
        writer.close()
    return n


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """`folder/prepared.json`; FileNotFoundError saying how to make it when absent."""
    file = Path(folder) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: prepare the data with `python -m ctcal_jax.prepare "
                                f"--pretrained MODEL --data IMAGE_FOLDER --out {folder}` (a re-run finishes an "
                                "interrupted one)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); re-run `python -m ctcal_jax.prepare` to rewrite it") from None
    required = {"family", "resolution", "max_nouns", "shards"}
    missing = sorted(required - set(manifest)) if isinstance(manifest, dict) else sorted(required)
    if missing:
        raise ValueError(f"{file}: not a prepared-data manifest (no {missing}); re-run `python -m ctcal_jax.prepare`")
    return manifest


class RecordsSource:
    """grain random-access source over a prepared folder's shards. Picklable (paths only)."""

    def __init__(self, folder: str | Path, *, family: str | None = None, resolution: int | None = None,
                 max_nouns: int | None = None):
        """Checks the manifest against what the run expects (`None`: not checked)."""
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        for key, want in (("family", family), ("resolution", resolution), ("max_nouns", max_nouns)):
            if want is not None and self.manifest[key] != want:
                raise ValueError(f"{self.folder / MANIFEST}: prepared with {key}={self.manifest[key]!r}, "
                                 f"but the run has {key}={want!r}")
        paths = [str(self.folder / s["file"]) for s in self.manifest["shards"]]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder}: shards listed in {MANIFEST} are missing: {missing}")
        self.paths = paths
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) == 0:
            raise ValueError(f"{self.folder / MANIFEST}: no records")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return deserialize(self._records[index])

    def __repr__(self) -> str:
        return f"RecordsSource({str(self.folder)!r}, {len(self)} records)"
