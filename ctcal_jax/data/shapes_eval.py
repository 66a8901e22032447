"""The shapes world's exact evaluator: what an image shows, judged against its prompt with no neural
network (`evaluate`, `score`). numpy only, deterministic; the world is `ctcal_jax.data.shapes`.

The evaluator (`evaluate`, thresholds below): a pixel takes the palette colour it is nearest to once
mixed with the background (an edge pixel is such a mix), kept when within `COLOUR_TOLERANCE` and at
least half that colour (`segment`); same-colour pixels form 8-connected components; components under
`MIN_AREA·H·W` pixels are specks and dropped; a component's shape comes from its fill of its bounding
box (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2), its aspect and the share of its pixels in the upper
half of the box (an upright triangle 1/4, the others 1/2); objects are matched to components by
colour and shape, relations judged from the matched components' centroids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctcal_jax.data.shapes import BACKGROUND, COLOURS, Scene, along_across, scene_from_prompt

# Evaluator thresholds. Sizes are fractions of the image side (or area); fills are area / box area.
COLOUR_TOLERANCE = 60.0  # max RGB distance (0-255 units) of a pixel from its colour's segment (`segment`)
MIN_COVERAGE = 0.5  # min share of the colour in a pixel mixing it with the background
MIN_AREA = 0.006  # components under this fraction of the image's pixels are specks (6 px at 32)
MAX_ASPECT = 1.5  # longer / shorter box side; beyond it a component is no shape of the world
# `upper`: the fraction of a component's pixels in the upper half of its box; an upright triangle has
# 1/4 there, a circle or a square 1/2. Measured over 1500 scenes of each size, clean, blurred (3×3
# binomial) and with noise (σ = 8/255): a triangle's upper is 0.25-0.36 at 32 px, a circle's 0.45-0.56;
# a square's fill >= 0.95, a circle's 0.67-0.88, a triangle's 0.50-0.73; the thresholds sit between.
TRIANGLE_UPPER = 0.4  # upper <= this: triangle, when its fill is in [TRIANGLE_FILL, MAX_TRIANGLE_FILL]
TRIANGLE_FILL, MAX_TRIANGLE_FILL = 0.35, 0.8
ROUND_UPPER = 0.6  # upper in (TRIANGLE_UPPER, this): a square or a circle, by fill
SQUARE_FILL = 0.91  # fill >= this: square
CIRCLE_FILL = 0.64  # fill in [this, SQUARE_FILL): circle
LARGE_RADIUS = 0.165  # half the longer box side / size: >= this is "large" (between 0.13 and 0.2)
RELATION_MIN = 0.1  # a relation holds when the centroids' displacement along its axis is >= this
# times the size and larger than the displacement across it


def _as_pixels(image: Any) -> np.ndarray:
    """float64 `[H, W, 3]` in 0-255 from uint8, or from floats in [0, 1] (`sampling.generate`)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image of shape {image.shape}: expected [H, W, 3]")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0
    raise ValueError(f"image of dtype {image.dtype}: expected uint8 or floats in [0, 1]")


def segment(image: Any) -> np.ndarray:
    """int `[H, W]`: the index in `COLOURS` of each pixel's colour, -1 for background and off-palette.

    An edge pixel (blurred, or a model's soft edge) mixes its object's colour with the background:
    each pixel is projected on every segment from `BACKGROUND` to a palette colour, and takes the
    colour whose segment is nearest, when that is within `COLOUR_TOLERANCE` and the pixel is at
    least `MIN_COVERAGE` of the way to the colour.
    """
    pixels = _as_pixels(image) - np.array(BACKGROUND, np.float64)  # [H, W, 3]
    directions = np.array(list(COLOURS.values()), np.float64) - np.array(BACKGROUND)  # [K, 3], K colours
    coverage = pixels @ directions.T / np.sum(directions**2, axis=-1)  # [H, W, K]
    nearest = np.clip(coverage, 0.0, 1.0)[..., None] * directions  # [H, W, K, 3]
    distance = np.linalg.norm(pixels[:, :, None, :] - nearest, axis=-1)  # [H, W, K]
    best = distance.argmin(-1)
    keep = ((np.take_along_axis(distance, best[..., None], -1)[..., 0] <= COLOUR_TOLERANCE)
            & (np.take_along_axis(coverage, best[..., None], -1)[..., 0] >= MIN_COVERAGE))
    return np.where(keep, best, -1)


def label_components(classes: np.ndarray) -> np.ndarray:
    """int `[H, W]`: 8-connected components of equal non-negative `classes`, each labelled by a
    positive id (0 elsewhere). Every pixel takes the largest id among its same-class neighbours until
    nothing changes: one step per pixel of a component's diameter, cheap on these small images."""
    h, w = classes.shape
    labels = np.where(classes >= 0, np.arange(1, h * w + 1).reshape(h, w), 0)
    padded_classes = np.pad(classes, 1, constant_values=-1)
    same = [padded_classes[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    same = [s & (classes >= 0) for s in same]
    while True:
        padded = np.pad(labels, 1)
        neighbours = [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                      if dy or dx]
        new = labels
        for s, n in zip(same, neighbours):
            new = np.where(s, np.maximum(new, n), new)
        if np.array_equal(new, labels):
            return labels
        labels = new


def classify_shape(fill: float, upper: float, aspect: float) -> str | None:
    """The world's shape of a component from its box fill, upper-half share and aspect (thresholds
    above), or None when it is none of them (an inverted triangle is none)."""
    if aspect > MAX_ASPECT:
        return None
    if upper <= TRIANGLE_UPPER:
        return "triangle" if TRIANGLE_FILL <= fill <= MAX_TRIANGLE_FILL else None
    if upper < ROUND_UPPER:
        return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else None
    return None


def components(image: Any) -> list[dict[str, Any]]:
    """The image's objects as found: one dict per component of at least `MIN_AREA` of the pixels,
    largest first: `colour`, `shape` (None: no shape of the world), `size`, `area` (pixels), `x`,
    `y` (centroid), `fill`, `upper`, `aspect` (the shape features)."""
    classes = segment(image)
    h, w = classes.shape
    labels = label_components(classes)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    found = []
    for i, area in zip(ids, areas):
        if area < MIN_AREA * h * w:
            continue
        ys, xs = np.nonzero(labels == i)
        top, height = ys.min(), ys.max() + 1 - ys.min()
        width = xs.max() + 1 - xs.min()
        middle = 2 * top + height  # twice the box's mid-height, against 2 * row + 1 (row centres)
        upper = (np.sum(2 * ys + 1 < middle) + 0.5 * np.sum(2 * ys + 1 == middle)) / area
        fill, aspect = area / (width * height), max(width, height) / min(width, height)
        found.append({"colour": tuple(COLOURS)[classes[ys[0], xs[0]]],
                      "shape": classify_shape(fill, upper, aspect),
                      "size": "large" if max(width, height) / 2 >= LARGE_RADIUS * h else "small",
                      "area": int(area), "x": float(xs.mean() + 0.5), "y": float(ys.mean() + 0.5),
                      "fill": float(fill), "upper": float(upper), "aspect": float(aspect)})
    return sorted(found, key=lambda c: -c["area"])


def evaluate(image: Any, scene_or_prompt: Scene | str) -> dict[str, Any]:
    """Score one image (uint8 `[H, W, 3]`, or floats in [0, 1]; square) against its prompt.

    Returns per object (tuples in prompt order): `present` (a component of its colour and shape, each
    component matched to at most one object), `colour` (a component of its colour exists), `shape`
    (one of its shape exists, any colour), `size` (its matched component has the stated size; None
    when the prompt states none). Per prompt: `objects` (all present), `relation` (None without one;
    else both present and their centroids satisfy it: displacement along its axis >= `RELATION_MIN`
    · size and larger than across it), `correct` (objects and relation), `count_ok` (as many
    components as objects), and `components` (what was found).
    """
    prompt = scene_or_prompt.prompt if isinstance(scene_or_prompt, Scene) else scene_or_prompt
    spec = scene_from_prompt(prompt)
    found = components(image)
    side = np.asarray(image).shape[0]
    # Greedy matching is a maximum matching here: a component fits only objects of one (colour,
    # shape), and those are interchangeable.
    matched: list[dict[str, Any] | None] = []
    used: set[int] = set()
    for o in spec.objects:
        k = next((k for k, c in enumerate(found)
                  if k not in used and c["colour"] == o.colour and c["shape"] == o.shape), None)
        matched.append(None if k is None else found[k])
        if k is not None:
            used.add(k)
    present = tuple(m is not None for m in matched)
    relation = None
    if spec.relation is not None:
        a, b = matched[0], matched[1]
        relation = False
        if a is not None and b is not None:
            along, across = along_across(spec.relation, np.array([a["x"], a["y"]]), np.array([b["x"], b["y"]]))
            relation = bool(along >= RELATION_MIN * side and along > abs(across))
    return {
        "prompt": prompt,
        "present": present,
        "colour": tuple(any(c["colour"] == o.colour for c in found) for o in spec.objects),
        "shape": tuple(any(c["shape"] == o.shape for c in found) for o in spec.objects),
        "size": tuple(None if o.size is None else m is not None and m["size"] == o.size
                      for o, m in zip(spec.objects, matched)),
        "objects": all(present),
        "relation": relation,
        "correct": all(present) and relation is not False,
        "count_ok": len(found) == len(spec.objects),
        "components": found,
    }


def score(images: Sequence[Any], scenes: Sequence[Scene | str]) -> dict[str, float | int | None]:
    """Accuracies over images and their scenes (or prompts): `correct`, `objects`, `count_ok` over
    prompts, `relation` over prompts with one, `present`, `colour`, `shape` over objects, `size` over
    objects with a stated size (None where nothing counts), and `n` the number of prompts."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    results = [evaluate(image, s) for image, s in zip(images, scenes)]

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    out: dict[str, float | int | None] = {k: mean([r[k] for r in results])
                                          for k in ("correct", "objects", "relation", "count_ok")}
    out.update({k: mean([v for r in results for v in r[k]]) for k in ("present", "colour", "shape", "size")})
    out["n"] = len(results)
    return out
