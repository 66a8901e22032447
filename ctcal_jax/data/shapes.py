"""Shapes world: procedurally rendered scenes of coloured shapes with their prompts, and an exact
evaluator with no neural network (issue #15). Small diffusion models are pretrained on it, fine-tuned
with CTCAL and measured by `evaluate`/`score`. numpy only; every function is deterministic.

Axes: H = W = `size` pixels (a scene's canvas; 32 by default, 64 works as well), n objects in a scene.
Coordinates are float pixels, x to the right and y down; pixel (row i, column j) is the unit square
centred at (j + 0.5, i + 0.5) and is inside a shape when its centre is (no anti-aliasing: an object's
mask is exactly its coloured pixels).

The world. 1-3 objects on a plain `BACKGROUND`, each a shape of `SHAPES` in a colour of `COLOURS` and a
size of `SIZES`: `radius` is the circle's radius, the square's half-side, and the triangle's half-base
and half-height (an upright isosceles triangle, apex up), `SIZE_FRACTION` of the canvas. Every object
lies in its box `[cx ± radius] × [cy ± radius]`; boxes are at least `BORDER·size` (≥ 1 px) inside
the canvas and at least `GAP·size` (≥ 2 px) apart along x or y, so objects never touch. The objects
of a scene have different colours; in `"binding"` scenes different shapes as well.

Prompts (lower case, no final period): an object is "a [small|large] <colour> <shape>"; scenes read
"A", "A and B", "A <relation> B" and "A, B and C" (`RELATIONS`). Each size adjective is included
with probability 1/2, independently, in every split. `Scene.nouns` are the shape words in object
order; two objects may share a shape word ("a red circle above a blue circle": nouns ("circle",
"circle")), which `nouns.given_spans` resolves to successive occurrences.

A relation "A rel B" holds with a clear margin: along the relation's axis A's centre is displaced
from B's by at least `RELATION_ALONG·size` in the named direction, and across it by at most
`RELATION_CROSS` times that.

Splits. "train" and "validation" never show a `HELD_OUT_PAIRS` colour-shape pair or a
`HELD_OUT_RELATIONS` relation prompt; "test" draws from the whole world. Each split has its own
seeds. `prompt_set` gives fixed per-category test sets in which every odd-indexed scene is held out
(`is_held_out`) and every even-indexed one is not.

The evaluator (`evaluate`, thresholds below): a pixel takes the palette colour it is nearest to once
mixed with the background (an edge pixel is such a mix), kept when within `COLOUR_TOLERANCE` and at
least half that colour (`segment`); same-colour pixels form 8-connected components; components under
`MIN_AREA·H·W` pixels are specks and dropped; a component's shape comes from its fill of its bounding
box (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2), its aspect and the share of its pixels in the upper
half of the box (an upright triangle 1/4, the others 1/2); objects are matched to components by
colour and shape, relations judged from the matched components' centroids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctcal_jax import text
from ctcal_jax.data.examples import text_example, text_side

SHAPES = ("circle", "square", "triangle")
# Saturated and pairwise ≥ 150 apart (RGB Euclidean), as is each from the background.
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 40), "blue": (40, 80, 230), "yellow": (235, 215, 40)}
# Dark grey: ≥ 150 from every palette colour (green is the nearest), and not black, so that noise added
# to it is not clipped at 0.
BACKGROUND = (40, 40, 40)
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.13, "large": 0.2}  # radius / size: at 32 px 4.2 and 6.4 px, three large ones fit
RELATIONS = ("to the left of", "to the right of", "above", "below")
CATEGORIES = ("single", "binding", "relation", "three")
OBJECTS = {"single": 1, "binding": 2, "relation": 2, "three": 3}  # objects per scene of each category
SPLITS = ("train", "validation", "test")

# Held out of "train" and "validation": one pair per shape, so every colour and shape is still seen.
HELD_OUT_PAIRS = (("red", "square"), ("green", "triangle"), ("blue", "circle"))
# (shape of A, relation, shape of B) for prompts "A relation B". Each visual layout is held out with
# its converse phrasing ("circle left of square" and "square right of circle" are the same picture),
# so the layout is never captioned in training; each shape pair keeps its three other layouts.
HELD_OUT_RELATIONS = (
    ("circle", "to the left of", "square"), ("square", "to the right of", "circle"),
    ("triangle", "above", "circle"), ("circle", "below", "triangle"),
    ("square", "above", "triangle"), ("triangle", "below", "square"),
)

BORDER = 0.03  # min distance of a box from the canvas edge / size (at least 1 px)
GAP = 0.05  # min gap between two boxes / size (at least 2 px: a background pixel between objects)
RELATION_ALONG = 0.25  # min centre displacement along a relation's axis / size
RELATION_CROSS = 0.5  # max |displacement across the axis| / displacement along it

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


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: `shape`, `colour`, `size` names; centre `(cx, cy)` and `radius` in pixels."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene on a `size`-pixel canvas: its objects in prompt order, the relation "objects[0]
    relation objects[1]" (or None), the prompt, its nouns (the shape words) and its category."""

    objects: tuple[Obj, ...]
    relation: str | None
    prompt: str
    nouns: tuple[str, ...]
    category: str
    size: int


@dataclasses.dataclass(frozen=True)
class Wanted:
    """An object a prompt asks for; `size` is None when the prompt does not say."""

    shape: str
    colour: str
    size: str | None


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a prompt asks for (`scene_from_prompt`)."""

    objects: tuple[Wanted, ...]
    relation: str | None


# --- prompts ------------------------------------------------------------------------------------------


def _phrase(shape: str, colour: str, size: str | None) -> str:
    return f"a {size} {colour} {shape}" if size else f"a {colour} {shape}"


def make_prompt(objects: Sequence[Wanted], relation: str | None) -> str:
    """The grammar's sentence for 1-3 objects (module docstring)."""
    p = [_phrase(o.shape, o.colour, o.size) for o in objects]
    if len(p) == 1 and relation is None:
        return p[0]
    if len(p) == 2:
        return f"{p[0]} {relation or 'and'} {p[1]}"
    if len(p) == 3 and relation is None:
        return f"{p[0]}, {p[1]} and {p[2]}"
    raise ValueError(f"no prompt for {len(p)} objects with relation {relation!r}")


def scene_from_prompt(prompt: str) -> Spec:
    """Parse a prompt of the grammar (module docstring): case, surrounding spaces and a final period
    are ignored. Raises ValueError naming the prompt and the first word that does not fit."""
    words = prompt.strip().lower().removesuffix(".").replace(",", " , ").split()
    vocabulary = {"a", "and", ",", *SHAPES, *COLOURS, *SIZES, *" ".join(RELATIONS).split()}
    unknown = [w for w in words if w not in vocabulary]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: unknown word {unknown[0]!r} (the shapes grammar has "
                         f"{sorted(vocabulary)})")
    pos = 0

    def fail(why: str) -> ValueError:
        at = repr(words[pos]) if pos < len(words) else "the end"
        return ValueError(f"prompt {prompt!r} is outside the shapes grammar: {why} at {at}")

    def take(options: Sequence[str], optional: bool = False) -> str | None:
        nonlocal pos
        if pos < len(words) and words[pos] in options:
            pos += 1
            return words[pos - 1]
        if optional:
            return None
        raise fail(f"expected one of {list(options)}")

    def obj() -> Wanted:
        take(("a",))
        size = take(SIZES, optional=True)
        colour = take(tuple(COLOURS))
        return Wanted(take(SHAPES), colour, size)

    objects, relation = [obj()], None
    if pos < len(words):
        relation = next((r for r in RELATIONS if words[pos:pos + len(r.split())] == r.split()), None)
        if relation is not None:
            pos += len(relation.split())
            objects.append(obj())
        elif take(("and", ",")) == "and":
            objects.append(obj())
        else:
            objects.append(obj())
            take(("and",))
            objects.append(obj())
    if pos < len(words):
        raise fail("expected the end of the prompt")
    return Spec(tuple(objects), relation)


# --- sampling -----------------------------------------------------------------------------------------


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"category={category!r}: expected one of {CATEGORIES}")


def _category(rng: np.random.Generator, n_objects: int | None, category: str | None) -> str:
    if category is not None:
        _check_category(category)
        if n_objects is not None and n_objects != OBJECTS[category]:
            raise ValueError(f"category {category!r} has {OBJECTS[category]} objects, not n_objects={n_objects}")
        return category
    if n_objects is None:
        return CATEGORIES[rng.integers(len(CATEGORIES))]
    options = [c for c in CATEGORIES if OBJECTS[c] == n_objects]
    if not options:
        raise ValueError(f"n_objects={n_objects}: a scene has 1, 2 or 3 objects")
    return options[rng.integers(len(options))]


def is_held_out(scene: Scene | Spec) -> bool:
    """Whether the scene shows a held-out colour-shape pair or is a held-out relation prompt."""
    o = scene.objects
    if any((w.colour, w.shape) in HELD_OUT_PAIRS for w in o):
        return True
    return scene.relation is not None and (o[0].shape, scene.relation, o[1].shape) in HELD_OUT_RELATIONS


def _composition(rng: np.random.Generator, category: str, mode: str) -> tuple[list[tuple[str, str]], str | None]:
    """(colour, shape) per object and the relation, drawn until `mode` accepts them: "seen" (no
    held-out pair or relation), "held_out" (a held-out relation prompt of seen pairs for the relation
    category, a held-out pair otherwise) or "any"."""
    n = OBJECTS[category]
    for _ in range(10_000):
        colours = [tuple(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n]]
        if category == "binding":
            shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
        else:
            shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
        relation = RELATIONS[rng.integers(len(RELATIONS))] if category == "relation" else None
        pairs = list(zip(colours, shapes))
        held_pair = any(p in HELD_OUT_PAIRS for p in pairs)
        held_relation = relation is not None and (shapes[0], relation, shapes[1]) in HELD_OUT_RELATIONS
        if (mode == "any" or (mode == "seen" and not (held_pair or held_relation))
                or (mode == "held_out" and (held_relation and not held_pair if relation else held_pair))):
            return pairs, relation
    raise RuntimeError(f"no {mode} composition of category {category!r}")  # unreachable: each has p > 1/20


def along_across(relation: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For "A relation B" with centres `a`, `b` `[..., 2]` (x, y): the displacement of A from B in
    the relation's direction (positive when it holds) and the displacement across that axis."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)  # from A to B
    dx, dy = d[..., 0], d[..., 1]
    along = {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[relation]
    across = dy if relation in ("to the left of", "to the right of") else dx
    return along, across


def _place(rng: np.random.Generator, radii: Sequence[float], relation: str | None, size: int) -> list[np.ndarray]:
    """Object centres satisfying the layout rules (module docstring), by rejection: each object takes
    the first of 64 candidate centres that fits with those already placed; a dead end starts over."""
    border, gap = max(1.0, BORDER * size), max(2.0, GAP * size)
    for _ in range(500):
        centres: list[np.ndarray] = []
        for k, r in enumerate(radii):
            candidates = rng.uniform(border + r, size - border - r, (64, 2))
            ok = np.ones(len(candidates), bool)
            for c, rc in zip(centres, radii):
                ok &= np.abs(candidates - c).max(axis=1) >= r + rc + gap  # boxes apart along x or y
            if relation is not None and k == 1:
                along, across = along_across(relation, centres[0], candidates)
                ok &= (along >= RELATION_ALONG * size) & (np.abs(across) <= RELATION_CROSS * along)
            if not ok.any():
                break
            centres.append(candidates[np.argmax(ok)])
        else:
            return centres
    raise RuntimeError(f"could not place objects of radii {list(radii)} on a {size}-pixel canvas")


def _sample(rng: np.random.Generator, category: str, size: int, mode: str) -> Scene:
    pairs, relation = _composition(rng, category, mode)
    sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=len(pairs))]
    stated = rng.random(len(pairs)) < 0.5
    radii = [SIZE_FRACTION[s] * size for s in sizes]
    centres = _place(rng, radii, relation, size)
    objects = tuple(Obj(shape, colour, s, float(c[0]), float(c[1]), r)
                    for (colour, shape), s, c, r in zip(pairs, sizes, centres, radii))
    prompt = make_prompt([Wanted(o.shape, o.colour, o.size if t else None) for o, t in zip(objects, stated)], relation)
    return Scene(objects, relation, prompt, tuple(o.shape for o in objects), category, size)


def sample_scene(
    rng: np.random.Generator,
    split: str = "train",
    n_objects: int | None = None,
    size: int = 32,
    category: str | None = None,
) -> Scene:
    """A random scene of `split` ("train"/"validation": no held-out composition; "test": any).

    `category` (one of `CATEGORIES`) or `n_objects` fix the kind of scene; by default the category is
    uniform over `CATEGORIES` (for 2 objects: binding or relation, one half each).
    """
    _check_split(split)
    category = _category(rng, n_objects, category)
    return _sample(rng, category, size, "any" if split == "test" else "seen")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")


def _rng(stream: int, split: str, seed: int, index: int) -> np.random.Generator:
    """A generator per (stream, split, seed, index); one entropy length for all, so no two collide."""
    return np.random.default_rng([stream, SPLITS.index(split), seed, index])


def prompt_set(category: str, split: str = "test", n: int = 64, seed: int = 0, size: int = 32) -> list[Scene]:
    """A fixed list of `n` scenes of `category`. For "test", odd indices are held-out scenes
    (`is_held_out`: a held-out relation prompt of seen pairs for "relation", a held-out colour-shape
    pair otherwise) and even indices are seen ones; "train"/"validation" sets are all seen."""
    _check_split(split)
    _check_category(category)
    stream = 1 + CATEGORIES.index(category)  # stream 0: ShapesSource rows
    return [_sample(_rng(stream, split, seed, i), category, size,
                    "held_out" if split == "test" and i % 2 else "seen") for i in range(n)]


# --- rendering ----------------------------------------------------------------------------------------


def shape_mask(obj: Obj, size: int, scale: float = 1.0) -> np.ndarray:
    """bool `[size, size]`: the pixels whose centres lie in `obj` (coordinates times `scale`)."""
    centres = np.arange(size) + 0.5
    dx = centres[None, :] - obj.cx * scale
    dy = centres[:, None] - obj.cy * scale
    r = obj.radius * scale
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "triangle":  # apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"shape {obj.shape!r}: expected one of {SHAPES}")


def render(scene: Scene, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The scene's image uint8 `[H, W, 3]` and each object's mask bool `[n, H, W]` (exactly its
    coloured pixels). `size` defaults to the scene's canvas; another size scales the coordinates."""
    size = scene.size if size is None else size
    masks = np.stack([shape_mask(o, size, size / scene.size) for o in scene.objects])
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    for o, m in zip(scene.objects, masks):
        image[m] = COLOURS[o.colour]
    return image, masks


# --- the evaluator ------------------------------------------------------------------------------------


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


# --- the grain source ---------------------------------------------------------------------------------


class ShapesSource:
    """grain random-access source of shapes-world rows: row `i` is the scene `sample_scene` draws
    from a generator seeded by (split, seed, i), the same in every epoch, host and worker. Picklable.

    An example is the image folder's: `images` float32 `[R, R, 3]` in [-1, 1] (R = resolution) plus
    the prompt's text arrays with the shape words as given nouns (`examples.text_example`).
    `scene(i)` and `render(i)` give a row's scene and its image and masks for evaluation.
    """

    def __init__(
        self,
        encoders: text.PromptEncoders,
        *,
        split: str = "train",
        rows: int = 10_000,
        resolution: int = 32,
        max_nouns: int = 16,
        seed: int = 0,
    ):
        _check_split(split)
        if rows < 1:
            raise ValueError(f"rows={rows}: a shapes source needs at least one row")
        self.encoders = text_side(encoders)
        self.split, self.rows, self.resolution, self.max_nouns, self.seed = split, rows, resolution, max_nouns, seed

    def __len__(self) -> int:
        return self.rows

    def scene(self, index: int) -> Scene:
        """Row `index`'s scene."""
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} of a {self.rows}-row shapes source")
        return sample_scene(_rng(0, self.split, self.seed, index), self.split, size=self.resolution)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `index`'s image uint8 `[R, R, 3]` and object masks bool `[n, R, R]`."""
        return render(self.scene(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        image, _ = render(scene)
        return {"images": image.astype(np.float32) / 127.5 - 1.0,
                **text_example(self.encoders, scene.prompt, scene.nouns, max_nouns=self.max_nouns)}

    def __repr__(self) -> str:
        return f"ShapesSource({self.split!r}, {self.rows} rows, resolution={self.resolution}, seed={self.seed})"
