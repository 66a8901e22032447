"""Training images as diffusers' text-to-image train scripts prepare them.

`torchvision.transforms.Resize(resolution, interpolation)` (shorter side to `resolution`, the longer
side `int(resolution * long / short)`), `CenterCrop(resolution)` (offset `int(round((size - crop) /
2))`), `ToTensor()` and `Normalize([0.5], [0.5])`: pixel values in [-1, 1]. Interpolation: LANCZOS
(the scripts' `--image_interpolation_mode` default). Layout HWC: `[H, W, 3]` float32, H = W =
resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class UnusableImage(ValueError):
    """The file is not an image PIL can decode, or it is too small to train on."""


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """`(width, height)` with the shorter side at `resolution` (torchvision's rounding: truncate)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """PIL crop box `(left, top, right, bottom)` of the centred `resolution`² square."""
    left = int(round((width - resolution) / 2.0))
    top = int(round((height - resolution) / 2.0))
    return left, top, left + resolution, top + resolution


def load_image(path: str | Path, resolution: int, resample: int = Image.LANCZOS) -> np.ndarray:
    """`[resolution, resolution, 3]` float32 in [-1, 1] (module docstring).

    Raises UnusableImage when the file cannot be decoded (truncated, not an image) or its shorter
    side is below `resolution`: up-sampling would train on blur.
    """
    try:
        with Image.open(path) as img:
            img.load()  # PIL decodes lazily: a truncated file fails here, not at open
            img = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnusableImage(f"unreadable image: {e}") from e
    width, height = img.size
    if min(width, height) < resolution:
        raise UnusableImage(f"image is {width}x{height}, smaller than resolution {resolution} on its shorter side")
    size = resized_size(width, height, resolution)
    if size != (width, height):
        img = img.resize(size, resample)
    img = img.crop(center_crop_box(*size, resolution))
    return np.asarray(img, np.float32) / 127.5 - 1.0
