"""Pictures the trainer and the samplers write: attention overlays, per-noun figures, sample grids.

Pure numpy + PIL, no JAX: these run on the host, on arrays already fetched from the devices.
Images are `[H, W, 3]` floats in [0, 1] (a batch is `[N, H, W, 3]`); attention maps are `[h, w]`
(one noun) or `[h, w, N]` (N nouns) on the coarser grid of the attention layers (SPEC §2), already
min-max normalised to [0, 1] per noun. Figures are drawn on white with black text in PIL's bundled
font, so they render the same offline on every host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctcal_jax.atomic import atomic_write

# matplotlib's viridis (its 256-entry `_viridis_data` table) at 0, 0.1, ..., 1 of its range.
# Viridis is perceptually uniform with monotonically rising lightness, so a brighter tile means more
# attention whatever the image underneath, which a rainbow map like jet does not give. Linear
# interpolation between the 11 stops keeps that order; it departs from the full table by a few
# hundredths at most (blue, near the yellow end), which an overlay does not show.
_VIRIDIS = np.array([
    [0.267004, 0.004874, 0.329415], [0.282623, 0.140926, 0.457517], [0.253935, 0.265254, 0.529983],
    [0.206756, 0.371758, 0.553117], [0.163625, 0.471133, 0.558148], [0.127568, 0.566949, 0.550556],
    [0.134692, 0.658636, 0.517649], [0.266941, 0.748751, 0.440573], [0.477504, 0.821444, 0.318195],
    [0.741388, 0.873449, 0.149561], [0.993248, 0.906157, 0.143936],
])

MIN_TILE = 128  # px: a 16×16 map drawn smaller than this is unreadable in TensorBoard
_GAP = 6  # px between tiles and around text
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)


def viridis(values: Any) -> np.ndarray:
    """The viridis colour of each value: `[...]` in [0, 1] (clipped) -> `[..., 3]` float32 in [0, 1]."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(_VIRIDIS))
    rgb = [np.interp(v, stops, _VIRIDIS[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).astype(np.float32)


def resize_bilinear(x: Any, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a `[h, w]` or `[h, w, C]` array with half-pixel centres.

    The convention of `jax.image.resize(..., "bilinear")` and PyTorch's `align_corners=False`:
    output pixel i samples the input at `(i + 0.5) · h / height − 0.5`, clamped to the edge cells,
    so each map cell stays centred over the image region its attention query covered.
    """
    x = np.asarray(x, np.float32)
    rows = _interp_matrix(x.shape[0], height)  # [height, h]
    cols = _interp_matrix(x.shape[1], width)  # [width, w]
    return np.einsum("Hh,hw...,Ww->HW...", rows, x, cols).astype(np.float32)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` linear-interpolation weights (half-pixel centres, edge clamped)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def overlay(image: Any, amap: Any, alpha: float = 0.5) -> np.ndarray:
    """Alpha-blend a viridis-coloured attention map over an image.

    Args:
      image: `[H, W, 3]` float in [0, 1].
      amap: `[h, w]` in [0, 1], any grid; upsampled bilinearly to H×W.
      alpha: weight of the map colour; 0 returns the image, 1 the coloured map alone.

    Returns:
      `[H, W, 3]` float32 in [0, 1]: `(1 − alpha) · image + alpha · viridis(map)`.
    """
    image = np.asarray(image, np.float32)
    amap = np.asarray(amap, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    if amap.ndim != 2:
        raise ValueError(f"amap must be [h, w], got {amap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colour = viridis(resize_bilinear(amap, *image.shape[:2]))
    return np.clip((1.0 - alpha) * image + alpha * colour, 0.0, 1.0)


def to_pil(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a `[H, W, 3]` uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got {a.shape}")
    if a.dtype != np.uint8:
        a = np.round(np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def font(size: int = 16) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font at `size` px (Pillow >= 10.1 with FreeType); its fixed bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow 10.0 has no size; no FreeType: bitmap only
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, fnt: Any) -> tuple[int, int]:
    """(width, height) of `text` (may hold newlines) as drawn at the origin."""
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=fnt)
    return int(np.ceil(right)), int(np.ceil(bottom))


def _fit(draw: ImageDraw.ImageDraw, text: str, fnt: Any, width: int) -> str:
    """`text` cut to fit `width` px, with an ellipsis when cut (a long noun under a tile)."""
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + "…", font=fnt) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt: Any, width: int) -> str:
    """`text` broken into lines at spaces so each fits `width` px (a long prompt as a title)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=fnt) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, word, fnt, width))
    return "\n".join(lines)


_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # text metrics before the canvas exists


def _prompt_block(prompt: str, image: Any, words: Sequence[str], rows: Sequence[tuple[str, Any]], tile: int,
                  fnt: Any, label_w: int) -> Image.Image:
    """One prompt's block: title, then per `(label, maps [h, w, N])` row [image, overlay per word]."""
    image = np.asarray(image, np.float32)
    words = list(words)
    rows = [(label, np.asarray(m, np.float32)) for label, m in rows]
    for label, m in rows:
        if m.ndim != 3 or m.shape[-1] != len(words):
            name = label.split("\n")[0] or "the"
            raise ValueError(f"{name} maps must be [h, w, {len(words)}] for words {words}, got {m.shape}")
    # Tiles keep the image's aspect ratio at `tile` px high; maps are upsampled straight to the
    # tile so a 16×16 map is drawn at tile resolution, not at the latent's.
    tile_w = max(1, round(tile * image.shape[1] / image.shape[0]))
    base = np.asarray(to_pil(image).resize((tile_w, tile), Image.BILINEAR), np.float32) / 255.0
    line_h = _text_size(_MEASURE, "Ag", fnt)[1]
    width = label_w + (1 + len(words)) * (tile_w + _GAP) + _GAP
    title = _wrap(_MEASURE, str(prompt), fnt, width - 2 * _GAP)
    title_h = _text_size(_MEASURE, title, fnt)[1] if title else line_h
    row_h = tile + _GAP + line_h + _GAP  # tile, then its caption
    block = Image.new("RGB", (width, _GAP + title_h + _GAP + len(rows) * row_h), _BACKGROUND)
    draw = ImageDraw.Draw(block)
    draw.multiline_text((_GAP, _GAP), title, fill=_INK, font=fnt)
    for r, (label, m) in enumerate(rows):
        y = 2 * _GAP + title_h + r * row_h
        if label:
            draw.multiline_text((_GAP, y + (tile - _text_size(draw, label, fnt)[1]) // 2), label,
                                fill=_INK, font=fnt)
        tiles = [base] + [overlay(base, m[..., i]) for i in range(len(words))]
        for i, (pixels, caption) in enumerate(zip(tiles, ["image"] + words)):
            x = label_w + _GAP + i * (tile_w + _GAP)
            block.paste(to_pil(pixels), (x, y))
            caption = _fit(draw, str(caption), fnt, tile_w)
            cx = x + (tile_w - int(draw.textlength(caption, font=fnt))) // 2
            draw.text((cx, y + tile + _GAP), caption, fill=_INK, font=fnt)
    return block


def stack(blocks: Sequence[Image.Image]) -> Image.Image:
    """Blocks one under another, left-aligned; narrower ones are padded with background."""
    width = max(b.width for b in blocks)
    out = Image.new("RGB", (width, sum(b.height for b in blocks)), _BACKGROUND)
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    return out


def attention_figure(rows: Sequence[dict[str, Any]], tile: int = 256) -> Image.Image:
    """The trainer's per-noun attention-map overlays, one block per prompt.

    Each block has the prompt as its title, then a row labelled "student t=<t_student>" and one
    labelled "teacher t=<t_teacher>"; each row shows the plain image followed by one overlay per
    noun, the noun written under its tile. Prompts with fewer nouns than the widest leave the rest
    of their rows blank.

    Args:
      rows: per prompt a dict with `prompt` (str), `image` (`[H, W, 3]` in [0, 1]), `words`
        (list of N nouns), `student` and `teacher` (`[h, w, N]` maps in [0, 1]), `t_student` and
        `t_teacher` (floats: integer steps for DDPM, sigmas for flow matching).
      tile: tile height in px (at least `MIN_TILE`); tiles keep the image's aspect ratio.

    Returns:
      The figure as an RGB PIL image.
    """
    return labelled_maps_figure([
        {**r, "rows": [(f"{who}\nt={float(r[f't_{who}']):.4g}", r[who]) for who in ("student", "teacher")]}
        for r in rows], tile)


def labelled_maps_figure(blocks: Sequence[dict[str, Any]], tile: int = 256) -> Image.Image:
    """Per prompt a block: the prompt as title, then one row per `(label, maps [h, w, N])` of
    `block["rows"]`, each the image (`block["image"]`, `[H, W, 3]` in [0, 1]) followed by one
    overlay per word of `block["words"]` (maps in [0, 1]); labels on the left. `attention_figure`
    is this with student and teacher rows."""
    if not blocks:
        raise ValueError("a maps figure needs at least one prompt")
    if tile < MIN_TILE:
        raise ValueError(f"tile must be at least {MIN_TILE} px, got {tile}")
    fnt = font(max(12, tile // 12))
    label_w = max(_text_size(_MEASURE, label, fnt)[0] for b in blocks for label, _ in b["rows"]) + _GAP
    return stack([_prompt_block(b["prompt"], b["image"], b["words"], b["rows"], tile, fnt, label_w) for b in blocks])


def subject_figure(prompt: str, image: Any, words: Sequence[str], maps: Any, tile: int = 256) -> Image.Image:
    """One sample's subject maps (the sampler's overlays): the prompt as title, then the image and one
    overlay per subject, the subject's word written under its tile.

    Args:
      image: `[H, W, 3]` in [0, 1].
      words: the N subjects.
      maps: `[h, w, N]` in [0, 1] (each subject's processed map, min-max normalised).
      tile: tile height in px (at least `MIN_TILE`).
    """
    if tile < MIN_TILE:
        raise ValueError(f"tile must be at least {MIN_TILE} px, got {tile}")
    fnt = font(max(12, tile // 12))
    return _prompt_block(prompt, image, words, [("", maps)], tile, fnt, 0)


def image_grid(images: Any, cols: int, captions: Sequence[str] | None = None) -> Image.Image:
    """Images `[N, H, W, 3]` in [0, 1] as a grid `cols` wide, row-major, each with an optional caption.

    Cells keep the images' size; a last row that is not full is left blank on the right.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    n, h, w, _ = images.shape
    if n == 0 or cols < 1:
        raise ValueError(f"need at least one image and one column, got {n} images, cols={cols}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    fnt = font(max(12, min(h, w) // 24))
    caption_h = _text_size(_MEASURE, "Ag", fnt)[1] + _GAP if captions is not None else 0
    cols = min(cols, n)
    n_rows = -(-n // cols)
    cell_w, cell_h = w + _GAP, h + caption_h + _GAP
    grid = Image.new("RGB", (cols * cell_w + _GAP, n_rows * cell_h + _GAP), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = _GAP + (i % cols) * cell_w, _GAP + (i // cols) * cell_h
        grid.paste(to_pil(images[i]), (x, y))
        if captions is not None:
            draw.text((x, y + h + _GAP // 2), _fit(draw, str(captions[i]), fnt, w), fill=_INK, font=fnt)
    return grid


def save_png(image: Any, path: str | os.PathLike[str]) -> None:
    """Write `image` (PIL, uint8 or float `[H, W, 3]`) as a PNG at `path`, atomically.

    The PNG goes to a temporary file in the same folder, is flushed to disk, then renamed over
    `path`: a run killed mid-write (pre-emption) leaves the previous file or none, never a
    truncated one that a reader or a resumed run would choke on.
    """
    pil = to_pil(image)
    with atomic_write(path, "wb") as f:
        pil.save(f, format="PNG")
