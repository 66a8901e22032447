"""Shapes world: procedurally rendered scenes of coloured shapes with their prompts, ground-truth masks
and splits (issue #15). Small diffusion models are pretrained on it, fine-tuned with CTCAL and
measured by its exact evaluator (`shapes_eval`). numpy only; every function is deterministic.

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
