"""Training data: examples, sources (image folder, prepared records, synthetic), the grain loader.

    from ctcal_jax import data
    config.data = data.default_config()                  # kind, path, resolution, ...
    loader = data.make_loader(config.data, encoders, global_batch_size=64, seed=0)
    batch = next(loader)                                 # host batch: dict of numpy arrays
    loader.skipped_rows                                  # bad rows dropped so far on this host

Modules: `examples` (a row's text arrays), `images` (resize and crop as diffusers' scripts),
`bad_rows`, `imagefolder`, `records` (what `python -m ctcal_jax.prepare` writes), `synthetic`,
`shapes` (a rendered world of coloured shapes with an exact evaluator), `loader`. This folder also
ships the CLIP BPE vocabulary (`ctcal_jax.tokenizers`).
"""

from ctcal_jax.data.bad_rows import BadRow
from ctcal_jax.data.examples import text_example, text_side
from ctcal_jax.data.imagefolder import ImageFolderSource
from ctcal_jax.data.loader import BatchIterator, default_config, make_loader, open_source
from ctcal_jax.data.records import RecordsSource
from ctcal_jax.data.shapes import ShapesSource
from ctcal_jax.data.synthetic import SyntheticSource, smooth_latents

__all__ = ["BadRow", "BatchIterator", "ImageFolderSource", "RecordsSource", "ShapesSource", "SyntheticSource",
           "default_config", "make_loader", "open_source", "smooth_latents", "text_example", "text_side"]
