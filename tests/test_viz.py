"""ctcal_jax.viz: colormap, bilinear upsampling, overlays, figure layout and text, atomic PNG writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from ctcal_jax import viz

TILE = viz.MIN_TILE


def test_viridis_endpoints_and_rising_lightness():
    # The ends of matplotlib's viridis, and the property that makes it readable: lightness (Rec. 709
    # luma) rises monotonically, so more attention is always drawn brighter.
    np.testing.assert_allclose(viz.viridis(0.0), [0.267004, 0.004874, 0.329415], atol=1e-6)
    np.testing.assert_allclose(viz.viridis(1.0), [0.993248, 0.906157, 0.143936], atol=1e-6)
    np.testing.assert_allclose(viz.viridis(0.5), [0.127568, 0.566949, 0.550556], atol=1e-6)
    luma = viz.viridis(np.linspace(0, 1, 256)) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luma) > 0)
    np.testing.assert_array_equal(viz.viridis(np.array([-3.0, 7.0])), viz.viridis(np.array([0.0, 1.0])))


def test_resize_bilinear_half_pixel_centres():
    # [0, 1] to 4 px: samples at -0.25, 0.25, 0.75, 1.25 of the input grid, the ends clamped.
    np.testing.assert_allclose(viz.resize_bilinear(np.array([[0.0, 1.0]]), 1, 4)[0], [0, 0.25, 0.75, 1])
    x = np.random.default_rng(0).random((5, 7))
    np.testing.assert_allclose(viz.resize_bilinear(x, 5, 7), x, atol=1e-6)  # same size: identity
    np.testing.assert_allclose(viz.resize_bilinear(np.full((4, 4), 0.3), 12, 20), 0.3, atol=1e-6)


def test_overlay_colours_only_the_hot_cell():
    # A 4×4 map that is 1 in cell (1, 2), upsampled ×3 to 12×12: the centre pixel of that cell
    # (row 4, column 7) gets viridis(1); anything more than one cell away gets viridis(0).
    image = np.full((12, 12, 3), 0.2, np.float32)
    amap = np.zeros((4, 4), np.float32)
    amap[1, 2] = 1.0
    out = viz.overlay(image, amap, alpha=0.5)
    assert out.shape == (12, 12, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[4, 7], 0.5 * 0.2 + 0.5 * viz.viridis(1.0), atol=1e-6)
    cold = 0.5 * 0.2 + 0.5 * viz.viridis(0.0)
    near = np.zeros((12, 12), bool)
    near[1:8, 4:11] = True  # the cell (rows 3-5, columns 6-8) plus the half cell bilinear reaches
    np.testing.assert_allclose(out[~near], np.broadcast_to(cold, out[~near].shape), atol=1e-6)
    assert np.all(np.abs(out[3:6, 6:9] - cold).max(-1) > 0.05)  # the cell itself is coloured
    assert np.all((out >= 0) & (out <= 1))


def test_overlay_alpha_ends():
    rng = np.random.default_rng(1)
    image, amap = rng.random((8, 10, 3)), rng.random((2, 5))
    np.testing.assert_allclose(viz.overlay(image, amap, alpha=0.0), image, atol=1e-6)
    np.testing.assert_allclose(viz.overlay(image, amap, alpha=1.0),
                               viz.viridis(viz.resize_bilinear(amap, 8, 10)), atol=1e-6)
    with pytest.raises(ValueError):
        viz.overlay(image, amap[None])


def _row(n_words: int, prompt: str = "a prompt", words: list[str] | None = None,
         t_student: float = 500.0, colour=(1.0, 0.0, 0.0)) -> dict:
    return {
        "prompt": prompt,
        "image": np.broadcast_to(np.asarray(colour, np.float32), (32, 32, 3)),
        "words": words if words is not None else [f"noun{i}" for i in range(n_words)],
        "student": np.zeros((16, 16, n_words), np.float32),
        "teacher": np.zeros((16, 16, n_words), np.float32),
        "t_student": t_student,
        "t_teacher": 0.0,
    }


def test_figure_size_follows_nouns_and_prompts():
    w = [viz.attention_figure([_row(n)], tile=TILE).width for n in (1, 2, 3)]
    assert w[1] - w[0] == w[2] - w[1] > TILE  # one more tile (and a gap) per noun
    h = [viz.attention_figure([_row(2)] * p, tile=TILE).height for p in (1, 2, 3)]
    assert h[1] - h[0] == h[2] - h[1] == h[0] > 2 * TILE  # one block (two tile rows) per prompt
    # Mixed noun counts: as wide as the widest prompt; the narrower one's missing tiles are blank.
    mixed = np.asarray(viz.attention_figure([_row(3), _row(1)], tile=TILE))
    assert mixed.shape[1] == w[2]
    lower = mixed[h[0]:, w[0]:]  # second block, right of its last tile
    assert np.all(lower == 255)
    with pytest.raises(ValueError):
        viz.attention_figure([_row(1)], tile=64)  # below MIN_TILE
    with pytest.raises(ValueError):
        bad = _row(2)
        bad["words"] = ["one"]
        viz.attention_figure([bad], tile=TILE)


def _tile_boxes(fig: np.ndarray, colour: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """(row range, column range) of the pixels exactly `colour` (uint8)."""
    ys, xs = np.nonzero(np.all(fig == colour, axis=-1))
    return (ys.min(), ys.max() + 1), (xs.min(), xs.max() + 1)


def test_figure_text_is_drawn_where_it_belongs():
    # Plain image pure red, maps all 0: overlay tiles are a known flat colour, so tiles can be
    # found by colour and text located by what changes when only the text changes.
    base = np.asarray(viz.attention_figure([_row(1)], tile=TILE))
    red = np.array([255, 0, 0], np.uint8)
    cold = np.round(np.clip(0.5 * np.array([1.0, 0, 0]) + 0.5 * viz.viridis(0.0), 0, 1) * 255).astype(np.uint8)
    (red_y, red_x), (noun_y, noun_x) = _tile_boxes(base, red), _tile_boxes(base, cold)
    assert red_x[1] <= noun_x[0]  # the image, then the noun's overlay
    assert noun_y[1] - noun_y[0] > TILE  # two rows of tiles (student, teacher)

    def changed(**kw) -> tuple[np.ndarray, np.ndarray]:
        other = np.asarray(viz.attention_figure([_row(1, **kw)], tile=TILE))
        assert other.shape == base.shape
        return np.nonzero(np.any(other != base, axis=-1))

    # The noun: under its own tile, in both rows, never over a tile.
    ys, xs = changed(words=["a-much-longer-noun"])
    assert len(ys) and xs.min() >= noun_x[0] and xs.max() < noun_x[1]
    assert not np.any(np.all(base[ys, xs] == cold, axis=-1))
    assert ys.min() > noun_y[0] + TILE - 1 and ys.max() > noun_y[1] - 1  # below each tile row
    # The row label: left of every tile.
    ys, xs = changed(t_student=999.0)
    assert len(ys) and xs.max() < red_x[0]
    # The prompt: above every tile.
    ys, xs = changed(prompt="another, longer prompt")
    assert len(ys) and ys.max() < red_y[0]
    # Text is ink on the white background.
    assert base[ys, xs].min() < 128


def test_image_grid_layout_and_captions():
    rng = np.random.default_rng(2)
    images = rng.random((5, 20, 30, 3))
    plain = viz.image_grid(images, cols=3)
    wide = viz.image_grid(images, cols=5)
    assert wide.width > plain.width and wide.height < plain.height
    assert viz.image_grid(images[:4], cols=2).size == viz.image_grid(images[:3], cols=2).size
    captioned = np.asarray(viz.image_grid(images, cols=3, captions=list("abcde")))
    assert captioned.shape[0] > plain.height and captioned.shape[1] == plain.width
    # The first image appears unchanged (up to uint8 rounding) in the top-left cell.
    top_left = np.asarray(plain)
    ys, xs = np.nonzero(np.any(top_left != 255, axis=-1))
    y0, x0 = ys.min(), xs.min()
    np.testing.assert_allclose(top_left[y0:y0 + 20, x0:x0 + 30] / 255.0, images[0], atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError):
        viz.image_grid(images, cols=2, captions=["only one"])


def test_save_png_is_atomic_and_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.random((9, 11, 3))
    path = tmp_path / "sub" / "fig.png"
    viz.save_png(image, path)
    viz.save_png(viz.to_pil(image), path)  # overwrite in place
    assert os.listdir(path.parent) == ["fig.png"]  # no temporary file left behind
    back = np.asarray(Image.open(path))
    np.testing.assert_array_equal(back, np.round(image * 255).astype(np.uint8))


def test_save_png_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    viz.save_png(np.zeros((4, 4, 3)), path)
    before = path.read_bytes()

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"half a png")  # the temp file exists and holds a partial write
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        viz.save_png(np.ones((4, 4, 3)), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["fig.png"]


def test_subject_figure_one_row_with_a_tile_per_subject():
    image = np.full((32, 32, 3), 0.5, np.float32)
    sizes = [viz.subject_figure("a cat", image, [f"w{i}" for i in range(n)], np.zeros((4, 4, n)), tile=TILE).size
             for n in (1, 2)]
    assert sizes[1][0] > sizes[0][0] and sizes[1][1] == sizes[0][1]
    one_row = viz.subject_figure("a cat", image, ["cat"], np.zeros((4, 4, 1)), tile=TILE).height
    assert one_row < viz.attention_figure([_row(1)], tile=TILE).height  # one row, not student + teacher
    with pytest.raises(ValueError, match=r"\[h, w, 2\]"):
        viz.subject_figure("a cat", image, ["cat", "dog"], np.zeros((4, 4, 1)), tile=TILE)
