"""`python -m ctcal_jax.prepare`: an image folder -> prepared records (`ctcal_jax.data.records`).

    python -m ctcal_jax.prepare --pretrained DIFFUSERS_DIR --data IMAGE_FOLDER --out DIR \\
        [--resolution 512] [--max-nouns 16] [--shard-size 1024] [--batch-size 8] [--include-adjectives]

Once per data set, so that training runs neither the VAE encoder, nor T5, nor the tagger:
- images resized and centre-cropped as diffusers' train scripts do (`data.images`), encoded with the
  pipeline's VAE: the posterior mean, then `(z − shift) · scale` from the VAE config (`latents`);
- SD3 and FLUX.1: T5's `last_hidden_state` on the prompt (`t5_embeds`; SD3 without T5: zeros);
- the text arrays (`data.examples`): nouns from the row's `nouns`, else tagged by Stanza.

Shard k holds the examples of metadata rows `[k·shard_size, (k+1)·shard_size)`; bad rows
(`data.bad_rows`) are skipped, logged and counted. Each shard is written under a temporary name and
renamed when complete, so a re-run of the same command skips finished shards (never rewriting
them) and redoes only what an interruption left unfinished. `DIR/prepared.json` is written last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from conversion import load_component, load_encoders
from conversion.pipeline import resolve
from ctcal_jax import nouns, text
from ctcal_jax.data import bad_rows, records
from ctcal_jax.data.imagefolder import ImageFolderSource
from ctcal_jax.models.vae import scale_latents

ARGS_FILE = "prepare_args.json"


def _encoders_fn(vae, vae_params, encoders: text.PromptEncoders, text_params: dict[str, Any]):
    """`(images [B, R, R, 3], t5 ids [B, T] | None) -> (latents, t5_embeds | None)`, jitted once."""
    latents = jax.jit(lambda p, x: scale_latents(vae.apply({"params": p}, x, method="encode")[0], vae))
    component = text.T5_COMPONENT.get(encoders.family)
    t5 = None
    if component in encoders.models:
        t5 = jax.jit(lambda p, ids: text.t5_embeddings(encoders, p, {component: ids}))

    def encode(images: np.ndarray, t5_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        z = np.asarray(latents(vae_params, images), np.float32)
        if component is None:
            return z, None
        if t5 is None:  # SD3 saved without T5 (FLUX.1 cannot be loaded without it)
            return z, np.zeros((len(images), encoders.max_lengths[component], encoders.joint_attention_dim),
                               np.float32)
        return z, np.asarray(t5({component: text_params[component]}, t5_ids), np.float32)

    return encode


def _shard_examples(source: ImageFolderSource, rows: range, batch_size: int, encode, progress: tqdm,
                    stats: dict[str, int]) -> Iterator[dict[str, Any]]:
    """The prepared examples of `rows`, in order; bad rows skipped and counted in `stats["skipped"]`."""
    for start in range(rows.start, rows.stop, batch_size):
        examples = []
        for i in range(start, min(start + batch_size, rows.stop)):
            example = source[i]
            if bad_rows.is_skipped(example):
                logging.warning("skipping a bad row: %s", example[bad_rows.SKIPPED])
                stats["skipped"] += 1
            else:
                examples.append(example)
            progress.update(1)
        if not examples:
            continue
        n = len(examples)
        # Padded to batch_size: one compiled shape for every batch, the last one included.
        images = np.zeros((batch_size, *examples[0]["images"].shape), np.float32)
        images[:n] = np.stack([e.pop("images") for e in examples])
        t5_ids = None
        component = text.T5_COMPONENT.get(source.encoders.family)
        if component in source.encoders.tokenizers:
            t5_ids = np.zeros((batch_size, source.encoders.max_lengths[component]), np.int32)
            t5_ids[:n] = np.stack([e["input_ids"][component] for e in examples])
        latents, t5_embeds = encode(images, t5_ids)
        for j, example in enumerate(examples):
            example["latents"] = latents[j]
            if t5_embeds is not None:
                example["t5_embeds"] = t5_embeds[j]
            yield example


def _check_args(out: Path, args: dict[str, Any]) -> None:
    """Refuse to resume into `out` with other arguments: its shards would not fit together."""
    file = out / ARGS_FILE
    if file.is_file():
        before = json.loads(file.read_text())
        if before != args:
            changed = {k: (before.get(k), v) for k, v in args.items() if before.get(k) != v}
            raise ValueError(f"{out} was prepared with other arguments (before, now): {changed}; "
                             "use a new --out folder")
    else:
        file.write_text(json.dumps(args, indent=2))


def prepare(
    pretrained: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    resolution: int = 512,
    max_nouns: int = 16,
    shard_size: int = 1024,
    batch_size: int = 8,
    include_adjectives: bool = False,
    tagger: nouns.Tagger = "stanza",
) -> dict[str, Any]:
    """Prepare `data` (an image folder) for the diffusers pipeline `pretrained` into `out` (module
    docstring); returns the manifest written to `out/prepared.json`. `tagger`: "stanza" or a
    callable (`nouns.tag`); rows that name their nouns are not tagged."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = resolve(str(pretrained))  # a folder, a hub id or builtin:<name>, as the trainer takes
    encoders, text_params = load_encoders(pretrained)
    vae, vae_params = load_component(pretrained, "vae")
    source = ImageFolderSource(data, encoders, resolution=resolution, max_nouns=max_nouns,
                               include_adjectives=include_adjectives, tagger=tagger)
    metadata = Path(data) / "metadata.jsonl"
    _check_args(out, {"pretrained": str(Path(pretrained).resolve()), "data": str(Path(data).resolve()),
                      "metadata_bytes": metadata.stat().st_size, "rows": len(source), "resolution": resolution,
                      "max_nouns": max_nouns, "shard_size": shard_size, "include_adjectives": include_adjectives})
    encode = _encoders_fn(vae, vae_params, encoders, text_params)
    progress = tqdm(total=len(source), desc="prepare", unit="row")
    shards = []
    for k in range(math.ceil(len(source) / shard_size)):
        rows = range(k * shard_size, min((k + 1) * shard_size, len(source)))
        path = out / records.shard_name(k)
        if path.is_file():  # finished by an earlier run: renamed only once complete
            count = _num_records(path)
            progress.update(len(rows))
        else:
            stats = {"skipped": 0}
            tmp = path.with_name(path.name + ".tmp")
            count = records.write_shard(tmp, _shard_examples(source, rows, batch_size, encode, progress, stats))
            os.replace(tmp, path)
        shards.append({"file": path.name, "rows": len(rows), "records": count})
    progress.close()
    manifest = _manifest(out, shards, encoders.family, resolution, max_nouns, include_adjectives, vae)
    (out / records.MANIFEST).write_text(json.dumps(manifest, indent=2))
    logging.info("prepared %d records from %d rows (%d skipped) in %s", manifest["records"], manifest["rows"],
                 manifest["skipped_rows"], out)
    return manifest


def _num_records(path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def _manifest(out: Path, shards: list[dict[str, Any]], family: str, resolution: int, max_nouns: int,
              include_adjectives: bool, vae) -> dict[str, Any]:
    """`prepared.json` (`data.records` docstring); keys, shapes and dtypes from the first record."""
    first = next((s for s in shards if s["records"]), None)
    spec: dict[str, Any] = {}
    if first is not None:
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(str(out / first["file"]))
        example = records.deserialize(reader.read([0])[0])
        reader.close()
        leaves = jax.tree_util.tree_flatten_with_path(example)[0]
        spec = {"/".join(str(getattr(k, "key", k)) for k in p): x for p, x in leaves}
    rows, count = sum(s["rows"] for s in shards), sum(s["records"] for s in shards)
    return {
        "family": family, "resolution": resolution, "max_nouns": max_nouns, "include_adjectives": include_adjectives,
        "keys": sorted(spec), "shapes": {k: list(np.shape(x)) for k, x in spec.items()},
        "dtypes": {k: str(np.asarray(x).dtype) for k, x in spec.items()},
        "shards": shards, "rows": rows, "records": count, "skipped_rows": rows - count,
        "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="diffusers pipeline folder (model_index.json), hub id or builtin:<name>: "
                        "the trainer's model.pretrained")
    parser.add_argument("--data", required=True, help="image folder with metadata.jsonl")
    parser.add_argument("--out", required=True, help="output folder (re-running resumes)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--max-nouns", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--include-adjectives", action="store_true")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    return prepare(args.pretrained, args.data, args.out, resolution=args.resolution, max_nouns=args.max_nouns,
                   shard_size=args.shard_size, batch_size=args.batch_size,
                   include_adjectives=args.include_adjectives)


if __name__ == "__main__":
    main()
