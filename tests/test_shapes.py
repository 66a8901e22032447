"""The shapes world (`ctcal_jax.data.shapes`): its evaluator scores the world's own renders at 100%, also
blurred or noisy, and catches recoloured, erased, moved and wrong-shaped objects; scenes are
deterministic, splits keep the held-out compositions out of training, masks are the rendered pixels,
prompts parse back; the grain source gives the loader's example keys, runs through `make_loader` and
pickles."""

import dataclasses
import pickle

import numpy as np
import pytest

from conversion import load_encoders
from conversion.tiny import materialize
from ctcal_jax import data
from ctcal_jax.data import shapes, shapes_eval
from ctcal_jax.data.shapes import COLOURS, Scene


@pytest.fixture(scope="module")
def sd():
    """The built-in tiny SD 2 pipeline's text side (CLIP tokenizer, max length 77)."""
    encoders, _ = load_encoders(materialize("tiny-sd2"))
    return encoders


def blur(image: np.ndarray) -> np.ndarray:
    """A slight blur: the 3×3 binomial kernel ([1, 2, 1] / 4 along each axis), edges replicated."""
    x = image.astype(np.float64)
    for axis in (0, 1):
        p = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        lo, mid, hi = (np.take(p, np.arange(k, k + x.shape[axis]), axis=axis) for k in range(3))
        x = (lo + 2 * mid + hi) / 4
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def noisy(image: np.ndarray, seed: int, sigma: float = 8.0) -> np.ndarray:
    """Gaussian noise of σ = 8/255 of the range, rounded and clipped to uint8."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def scenes(size: int, n: int) -> list[Scene]:
    """`n` test scenes of each category (held-out and seen), plus `n` random training scenes."""
    out = [s for c in shapes.CATEGORIES for s in shapes.prompt_set(c, "test", n=n, size=size)]
    return out + [shapes.sample_scene(np.random.default_rng([7, size, i]), "train", size=size) for i in range(n)]


def assert_perfect(result: dict) -> None:
    assert result["correct"] and result["objects"] and result["count_ok"], result
    assert all(result["present"]) and all(result["colour"]) and all(result["shape"]), result
    assert all(s in (None, True) for s in result["size"]), result


# --- the evaluator on the world's own renders --------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_own_renders_score_100_percent(size):
    all_scenes = scenes(size, 40 if size == 32 else 16)
    images = [shapes.render(s)[0] for s in all_scenes]
    for image, scene in zip(images, all_scenes):
        assert_perfect(shapes_eval.evaluate(image, scene))
    totals = shapes_eval.score(images, all_scenes)
    assert totals["n"] == len(all_scenes)
    assert all(totals[k] == 1.0 for k in ("correct", "objects", "relation", "count_ok", "present", "colour", "shape",
                                           "size")), totals
    # The same from the prompt alone, and from floats in [0, 1] (what sampling.generate returns).
    assert shapes_eval.evaluate(images[0].astype(np.float32) / 255, all_scenes[0].prompt)["correct"]
    # A scene drawn on another canvas size (its coordinates scaled).
    other = 64 if size == 32 else 32
    for scene in all_scenes[::10]:
        assert_perfect(shapes_eval.evaluate(shapes.render(scene, other)[0], scene))


@pytest.mark.parametrize("size", [32, 64])
def test_mild_noise_and_blur_still_score_100_percent(size):
    for i, scene in enumerate(scenes(size, 16 if size == 32 else 6)):
        image = shapes.render(scene)[0]
        for changed in (noisy(image, i), blur(image), noisy(blur(image), i)):
            assert_perfect(shapes_eval.evaluate(changed, scene))


# --- perturbed renders are caught ----------------------------------------------------------------------


def test_recoloured_object_is_caught():
    for scene in shapes.prompt_set("three", "test", n=12):
        k = 1
        unused = next(c for c in COLOURS if c not in {o.colour for o in scene.objects})
        objects = list(scene.objects)
        objects[k] = dataclasses.replace(objects[k], colour=unused)
        r = shapes_eval.evaluate(shapes.render(dataclasses.replace(scene, objects=tuple(objects)))[0], scene)
        assert not r["present"][k] and not r["colour"][k] and r["shape"][k]
        assert not r["objects"] and not r["correct"]
        assert r["present"][0] and r["present"][2] and r["count_ok"]


def test_erased_object_is_not_present():
    for scene in shapes.prompt_set("binding", "test", n=12):
        image, masks = shapes.render(scene)
        image[masks[0]] = shapes.BACKGROUND
        r = shapes_eval.evaluate(image, scene)
        assert r["present"] == (False, True) and not r["colour"][0]
        assert not r["objects"] and not r["correct"] and not r["count_ok"]


def test_swapped_positions_break_the_relation():
    checked = 0
    for scene in shapes.prompt_set("relation", "test", n=32):
        a, b = scene.objects
        moved = (dataclasses.replace(a, cx=b.cx, cy=b.cy), dataclasses.replace(b, cx=a.cx, cy=a.cy))
        if any(not o.radius <= c <= scene.size - o.radius for o in moved for c in (o.cx, o.cy)):
            continue  # a large object swapped into a small one's place would leave the canvas
        r = shapes_eval.evaluate(shapes.render(dataclasses.replace(scene, objects=moved))[0], scene)
        assert r["objects"] and r["relation"] is False and not r["correct"], (scene.prompt, r)
        checked += 1
    assert checked >= 10


def test_square_where_a_circle_is_asked_is_the_wrong_shape():
    checked = 0
    for i in range(200):
        scene = shapes.sample_scene(np.random.default_rng([3, i]), "test")
        shape_words = [o.shape for o in scene.objects]
        if shape_words.count("circle") != 1 or "square" in shape_words:
            continue
        k = shape_words.index("circle")
        objects = list(scene.objects)
        objects[k] = dataclasses.replace(objects[k], shape="square")
        r = shapes_eval.evaluate(shapes.render(dataclasses.replace(scene, objects=tuple(objects)))[0], scene)
        assert not r["present"][k] and not r["shape"][k] and r["colour"][k] and not r["correct"]
        checked += 1
    assert checked >= 20


def test_off_palette_and_specks_are_ignored():
    image = np.full((32, 32, 3), shapes.BACKGROUND, np.uint8)
    image[4:14, 4:14] = (160, 40, 200)  # purple: no palette colour
    image[20:22, 20:22] = COLOURS["red"]  # a 4-pixel speck
    assert shapes_eval.components(image) == []
    r = shapes_eval.evaluate(image, "a red square")
    assert r["present"] == (False,) and r["colour"] == (False,) and r["count_ok"] is False


# --- scenes, splits, masks, prompts ---------------------------------------------------------------------


def test_rows_are_deterministic(sd):
    a = shapes.ShapesSource(sd, rows=20, max_nouns=4)
    b = shapes.ShapesSource(sd, rows=20, max_nouns=4)
    for i in (0, 7, 19):
        assert a.scene(i) == b.scene(i)
        assert a[i]["images"].tobytes() == b[i]["images"].tobytes()
    assert shapes.prompt_set("relation", n=8) == shapes.prompt_set("relation", n=8)
    # Splits and seeds give other scenes.
    other = [shapes.ShapesSource(sd, rows=20, split="validation"), shapes.ShapesSource(sd, rows=20, seed=1)]
    for o in other:
        assert [o.scene(i) for i in range(20)] != [a.scene(i) for i in range(20)]


def test_training_rows_never_show_held_out_compositions(sd):
    for split in ("train", "validation"):
        source = shapes.ShapesSource(sd, split=split, rows=2000)
        seen = [source.scene(i) for i in range(len(source))]
        assert not any(shapes.is_held_out(s) for s in seen)
        pairs = {(o.colour, o.shape) for s in seen for o in s.objects}
        assert len(pairs) == 12 - len(shapes.HELD_OUT_PAIRS)
        assert {s.category for s in seen} == set(shapes.CATEGORIES)
    # The test sets hold every held-out pair and relation, at the odd indices.
    single = shapes.prompt_set("single", "test", n=64)
    assert {(s.objects[0].colour, s.objects[0].shape) for s in single[1::2]} == set(shapes.HELD_OUT_PAIRS)
    relation = shapes.prompt_set("relation", "test", n=64)
    assert {(s.objects[0].shape, s.relation, s.objects[1].shape) for s in relation[1::2]} == set(
        shapes.HELD_OUT_RELATIONS)
    for category in shapes.CATEGORIES:
        test_set = shapes.prompt_set(category, "test", n=16)
        assert [shapes.is_held_out(s) for s in test_set] == [i % 2 == 1 for i in range(16)]
        assert all(s.category == category for s in test_set)
    assert not any(shapes.is_held_out(s) for s in shapes.prompt_set("relation", "validation", n=32))


def test_layout_rules_hold():
    for scene in scenes(32, 30):
        objects = scene.objects
        assert len({o.colour for o in objects}) == len(objects)
        if scene.category == "binding":
            assert len({o.shape for o in objects}) == 2
        for o in objects:
            assert 1 <= o.cx - o.radius and o.cx + o.radius <= 31 and 1 <= o.cy - o.radius and o.cy + o.radius <= 31
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= a.radius + b.radius + 2
        if scene.relation:
            a, b = objects
            along, across = shapes.along_across(scene.relation, np.array([a.cx, a.cy]), np.array([b.cx, b.cy]))
            assert along >= 0.25 * 32 and abs(across) <= 0.5 * along


@pytest.mark.parametrize("size", [32, 64])
def test_masks_are_the_rendered_pixels(size):
    for scene in scenes(size, 5):
        image, masks = shapes.render(scene)
        assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        assert masks.dtype == bool and masks.shape == (len(scene.objects), size, size)
        assert masks.sum(0).max() == 1 and all(m.any() for m in masks)
        for o, m in zip(scene.objects, masks):
            assert (image[m] == COLOURS[o.colour]).all()
        assert (image[~masks.any(0)] == shapes.BACKGROUND).all()
        # The evaluator's colour labels are exactly the masks.
        expected = np.full((size, size), -1)
        for o, m in zip(scene.objects, masks):
            expected[m] = list(COLOURS).index(o.colour)
        np.testing.assert_array_equal(shapes_eval.segment(image), expected)


def test_prompts_parse_back():
    for scene in scenes(32, 10):
        spec = shapes.scene_from_prompt(scene.prompt)
        assert spec.relation == scene.relation
        assert [(w.shape, w.colour) for w in spec.objects] == [(o.shape, o.colour) for o in scene.objects]
        assert all(w.size in (None, o.size) for w, o in zip(spec.objects, scene.objects))
        assert shapes.make_prompt(spec.objects, spec.relation) == scene.prompt
        assert scene.nouns == tuple(o.shape for o in scene.objects)
        assert scene.prompt == scene.prompt.lower() and not scene.prompt.endswith(".")
    spec = shapes.scene_from_prompt("A Large red circle to the left of a blue square.")
    assert spec == shapes.Spec((shapes.Wanted("circle", "red", "large"), shapes.Wanted("square", "blue", None)),
                               "to the left of")
    spec = shapes.scene_from_prompt("a red circle, a small blue square and a green triangle")
    assert [w.shape for w in spec.objects] == ["circle", "square", "triangle"] and spec.relation is None
    # Some prompts of both kinds of sizes appear.
    stated = [w.size for s in scenes(32, 10) for w in shapes.scene_from_prompt(s.prompt).objects]
    assert None in stated and "small" in stated and "large" in stated


@pytest.mark.parametrize("prompt, words", [
    ("a purple circle", "unknown word 'purple'"),
    ("a red circle next to a blue square", "unknown word 'next'"),
    ("a red circle and", "outside the shapes grammar"),
    ("a red circle above", "outside the shapes grammar"),
    ("red circle", "outside the shapes grammar"),
    ("a circle red", "outside the shapes grammar"),
    ("a red circle, a blue square", "outside the shapes grammar"),
])
def test_prompts_outside_the_grammar_raise(prompt, words):
    with pytest.raises(ValueError, match=words) as e:
        shapes.scene_from_prompt(prompt)
    assert repr(prompt) in str(e.value)


# --- the grain source -----------------------------------------------------------------------------------


def test_source_example_has_the_image_folder_keys(sd):
    source = shapes.ShapesSource(sd, rows=8, max_nouns=4)
    assert len(source) == 8
    for i in range(8):
        ex, scene = source[i], source.scene(i)
        assert set(ex) == {"images", "input_ids", "noun_weights", "token_mask"}
        assert ex["images"].shape == (32, 32, 3) and ex["images"].dtype == np.float32
        assert ex["images"].min() >= -1 and ex["images"].max() <= 1
        np.testing.assert_array_equal(np.round((ex["images"] + 1) * 127.5).astype(np.uint8), source.render(i)[0])
        assert ex["noun_weights"].shape == (4, 77)
        assert ex["noun_weights"].any(-1).sum() == len(scene.nouns)
    with pytest.raises(IndexError):
        source.scene(8)


def test_repeated_shape_words_are_separate_nouns(sd):
    ex = data.text_example(sd, "a red circle above a blue circle", ("circle", "circle"), max_nouns=4)
    first, second = (np.flatnonzero(w).tolist() for w in ex["noun_weights"][:2])
    assert first and second and first != second


def test_source_through_make_loader_and_pickle(sd):
    c = data.default_config()
    c.kind, c.resolution, c.rows, c.max_nouns = "shapes", 32, 12, 4
    loader = data.make_loader(c, sd, global_batch_size=4, seed=0, process_index=0, process_count=1)
    batch = next(loader)
    assert batch["images"].shape == (4, 32, 32, 3) and batch["noun_weights"].shape == (4, 4, 77)
    assert batch["input_ids"]["text_encoder"].shape == (4, 77)
    loader.close()
    source = data.open_source(c, sd)
    copy = pickle.loads(pickle.dumps(source))
    assert repr(copy) == repr(source)
    np.testing.assert_array_equal(copy[5]["images"], source[5]["images"])
    assert copy.scene(5) == source.scene(5)
