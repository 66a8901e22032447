"""The data package on tiny data written here: examples' text arrays, image resizing, an image folder
with every kind of bad row, prepared records, synthetic rows, and the loader (host sharding, epochs,
checkpointed state with and without worker processes, orbax)."""

import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ctcal_jax import data, nouns, text
from ctcal_jax.data import records
from ctcal_jax.data.images import load_image
from tests.data_setup import GOOD, LINES, RES, ROWS, image, tagger, write_folder
from tests.tiny import real_clip_tokenizer, tiny_t5_tokenizer

@pytest.fixture(scope="module")
def clip():
    return real_clip_tokenizer(pad_token="!")


@pytest.fixture(scope="module")
def sd(clip):
    return text.PromptEncoders("sd", {"text_encoder": clip}, {}, {"text_encoder": 77})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


def _config(kind, path="", **kwargs):
    c = data.default_config()
    c.kind, c.path, c.resolution, c.max_nouns, c.tagger = kind, str(path), RES, 4, tagger
    c.update(kwargs)
    return c


# --- examples ---------------------------------------------------------------------------------------


def test_text_example_sd_equals_prepare_batch(sd, clip):
    ex = data.text_example(sd, "a cat and a dog on the left", max_nouns=4, tagger=tagger)
    ref = nouns.prepare_batch(["a cat and a dog on the left"], clip, max_nouns=4, seq_len=77, tagger=tagger)
    np.testing.assert_array_equal(ex["noun_weights"], ref["noun_weights"][0])
    np.testing.assert_array_equal(ex["token_mask"], ref["token_mask"][0])
    np.testing.assert_array_equal(ex["input_ids"]["text_encoder"],
                                  text.tokenize(clip, ["a cat and a dog on the left"], 77)["input_ids"][0])
    # By hand: SOT a cat and a dog ...: "cat" is token 2, "dog" token 5; "left" is blacklisted.
    assert ex["noun_weights"].shape == (4, 77) and ex["noun_weights"].dtype == np.float32
    assert np.flatnonzero(ex["noun_weights"][0]).tolist() == [2]
    assert np.flatnonzero(ex["noun_weights"][1]).tolist() == [5]
    assert not ex["noun_weights"][2:].any()
    assert np.flatnonzero(ex["token_mask"]).tolist() == list(range(1, 9))
    assert set(ex) == {"input_ids", "noun_weights", "token_mask"}  # no reward


def test_text_example_is_thread_safe(sd):
    """grain reads examples in threads; the shared tokenizer must not mix their lengths (it did: the
    Rust backend's padding/truncation state is per tokenizer, not per call)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"a cat and a dog {'very ' * (i % 9)}far away on the left" for i in range(48)]
    serial = [data.text_example(sd, p, ["cat", "dog"], max_nouns=4) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda p: data.text_example(sd, p, ["cat", "dog"], max_nouns=4), prompts))
    for a, b in zip(serial, threaded):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_text_example_given_nouns_and_reward(sd, clip):
    ex = data.text_example(sd, "a red car", ["red car"], 0.5, max_nouns=4, tagger="stanza")  # stanza never runs
    ref = nouns.prepare_batch(["a red car"], clip, max_nouns=4, seq_len=77, given=[["red car"]])
    np.testing.assert_array_equal(ex["noun_weights"], ref["noun_weights"][0])
    np.testing.assert_allclose(ex["noun_weights"][0, [2, 3]], [0.5, 0.5])
    assert ex["reward"].dtype == np.float32 and ex["reward"].shape == () and ex["reward"] == 0.5


def test_text_example_sd3_streams(clip, tmp_path):
    t5 = tiny_t5_tokenizer(tmp_path / "t5")
    tokenizers = {"text_encoder": real_clip_tokenizer(), "text_encoder_2": clip, "text_encoder_3": t5}
    enc = text.PromptEncoders("sd3", tokenizers, {}, {"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 256})
    prompt = "a cat and a dog on a red sofa"
    ex = data.text_example(enc, prompt, max_nouns=4, tagger=tagger)
    for suffix, tok, length in (("clip", real_clip_tokenizer(), 77), ("t5", t5, 256)):
        ref = nouns.prepare_batch([prompt], tok, max_nouns=4, seq_len=length, tagger=tagger)
        np.testing.assert_array_equal(ex[f"noun_weights_{suffix}"], ref["noun_weights"][0])
        np.testing.assert_array_equal(ex[f"token_mask_{suffix}"], ref["token_mask"][0])
    assert (ex["noun_weights_t5"].sum(-1) > 0).sum() == 3  # cat, dog, sofa
    assert sorted(ex["input_ids"]) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert ex["input_ids"]["text_encoder_3"].shape == (256,)

    no_t5 = text.PromptEncoders("sd3", {c: enc.tokenizers[c] for c in ("text_encoder", "text_encoder_2")}, {},
                                enc.max_lengths)
    ex = data.text_example(no_t5, prompt, max_nouns=4, tagger=tagger)
    assert ex["noun_weights_t5"].shape == (4, 256) and not ex["noun_weights_t5"].any()
    assert ex["token_mask_t5"].shape == (256,) and not ex["token_mask_t5"].any()
    assert sorted(ex["input_ids"]) == ["text_encoder", "text_encoder_2"]


# --- images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, resized, box", [
    ((64, 40), (51, 32), (10, 0, 42, 32)),  # landscape: 32 * 64 / 40 = 51.2 -> 51; (51 - 32) / 2 = 9.5 -> 10
    ((40, 60), (32, 48), (0, 8, 32, 40)),  # portrait: (48 - 32) / 2 = 8 from the top
    ((30, 45), None, None),  # shorter side below the resolution: refused, not up-sampled
    ((32, 32), (32, 32), (0, 0, 32, 32)),  # already the size: no resampling
])
def test_load_image_resizes_shorter_side_and_center_crops(tmp_path, size, resized, box):
    img = image(*size, seed=3)
    img.save(tmp_path / "x.png")
    if resized is None:
        with pytest.raises(ValueError, match="smaller than resolution 32"):
            load_image(tmp_path / "x.png", 32)
        return
    out = load_image(tmp_path / "x.png", 32)
    ref = img if resized == size else img.resize(resized, Image.LANCZOS)
    ref = np.asarray(ref.crop(box), np.float32) / 255.0 * 2.0 - 1.0
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_load_image_grey_and_rgba_become_rgb(tmp_path):
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((20, 20, 4), np.uint8)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g.png", 20), np.ones((20, 20, 3), np.float32))
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", 20), -np.ones((20, 20, 3), np.float32))


# --- image folder and bad rows ----------------------------------------------------------------------


def test_image_folder_examples_and_bad_rows(folder, sd, clip):
    src = data.ImageFolderSource(folder, sd, resolution=RES, max_nouns=4, tagger=tagger)
    assert len(src) == len(ROWS)
    reasons = {LINES[i]: src[i].get("skipped_row") for i in range(len(src)) if i not in GOOD}
    assert set(reasons) == {3, 4, 6, 7, 8}
    assert "missing file" in reasons[3] and "'missing.png'" in reasons[3]
    assert "unreadable image" in reasons[4] and "'3.jpg'" in reasons[4]
    assert "empty prompt" in reasons[6]
    assert "smaller than resolution 16" in reasons[7] and "'5.png'" in reasons[7]
    assert "malformed JSON" in reasons[8]
    assert all(str(folder / "metadata.jsonl") in r for r in reasons.values())
    for i in GOOD:
        ex = src[i]
        meta, (w, h, _) = ROWS[i]
        expected = load_image(folder / meta["file_name"], RES)
        np.testing.assert_array_equal(ex["images"], expected)
        ref = nouns.prepare_batch([meta["text"]], clip, max_nouns=4, seq_len=77, tagger=tagger,
                                  given=[meta.get("nouns")])
        np.testing.assert_array_equal(ex["noun_weights"], ref["noun_weights"][0])
        np.testing.assert_array_equal(ex["token_mask"], ref["token_mask"][0])
        # Some row has a reward, so every example has one: the row's, else 1.
        assert ex["reward"] == meta.get("reward", 1.0)
    # Row 1 names its nouns: "car" only, although the tagger would add nothing else either way.
    assert (src[1]["noun_weights"].sum(-1) > 0).sum() == 1


def test_fail_names_the_row_when_opening(folder, sd):
    with pytest.raises(ValueError, match=r"metadata.jsonl line 3 \(file_name 'missing.png'\): missing file"):
        data.ImageFolderSource(folder, sd, resolution=RES, tagger=tagger, on_bad_row="fail")
    with pytest.raises(ValueError, match="on_bad_row"):
        data.ImageFolderSource(folder, sd, resolution=RES, tagger=tagger, on_bad_row="ignore")


def test_fail_names_the_row_when_loading(tmp_path, sd):
    # Only load-time problems (truncated JPEG, too small): opening succeeds, loading raises.
    folder = write_folder(tmp_path, [ROWS[0], ROWS[3], ROWS[5]])
    src = data.ImageFolderSource(folder, sd, resolution=RES, tagger=tagger, on_bad_row="fail")
    assert src[0]["images"].shape == (RES, RES, 3)
    with pytest.raises(data.BadRow, match=r"line 2 \(file_name '3.jpg'\): unreadable image"):
        src[1]
    with pytest.raises(ValueError, match=r"line 3 \(file_name '5.png'\): image is 12x30, smaller than resolution"):
        src[2]


def test_every_row_bad_is_an_error(tmp_path, sd):
    folder = write_folder(tmp_path, [ROWS[2], ROWS[4]])
    with pytest.raises(ValueError, match="every row is bad"):
        data.ImageFolderSource(folder, sd, resolution=RES, tagger=tagger)


def _shuffled_rows(n: int, seed: int, count: int) -> list[int]:
    """The order the loader reads a one-host source of n rows: grain's epoch-reseeded shuffle."""
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
    return [ds[i] for i in range(count)]


def test_loader_skips_and_counts_bad_rows_exactly(folder, sd):
    it = data.make_loader(_config("imagefolder", folder), sd, global_batch_size=3, seed=7)
    order = _shuffled_rows(len(ROWS), 7, 100)
    good_seen = 0
    for _ in range(6):  # 18 good examples: 4.5 epochs of good rows
        batch = next(it)
        assert batch["images"].shape == (3, RES, RES, 3) and batch["noun_weights"].shape == (3, 4, 77)
        assert batch["reward"].shape == (3,)
        good_seen += 3
        # Consumed: the shuffled order up to the good_seen-th good row; skipped: the bad rows in it.
        consumed = next(k for k in range(len(order)) if sum(r in GOOD for r in order[: k + 1]) == good_seen) + 1
        expected_rows = [r for r in order[:consumed] if r in GOOD][-3:]
        expected_prompts = [text.tokenize(sd.tokenizers["text_encoder"], [ROWS[r][0]["text"]], 77)["input_ids"][0]
                            for r in expected_rows]
        np.testing.assert_array_equal(batch["input_ids"]["text_encoder"], np.stack(expected_prompts))
        assert it.skipped_rows == consumed - good_seen
    assert it.skipped_rows >= 4 * 5  # four whole epochs' bad rows at least


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_fail_raises_from_the_loader(tmp_path, sd, workers):
    folder = write_folder(tmp_path, [ROWS[0], ROWS[3]])
    it = data.make_loader(_config("imagefolder", folder, on_bad_row="fail", workers=workers), sd,
                          global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"line 2 \(file_name '3.jpg'\): unreadable image"):
        next(it)
    it.close()


# --- records and synthetic --------------------------------------------------------------------------


def test_records_round_trip(tmp_path, sd):
    examples = [{"latents": np.random.RandomState(i).randn(2, 2, 4).astype(np.float32),
                 **data.text_example(sd, p, max_nouns=4, tagger=tagger, reward=0.1 * i)}
                for i, p in enumerate(["a cat", "a dog", "a red car"])]
    assert records.write_shard(tmp_path / records.shard_name(0), examples[:2]) == 2
    assert records.write_shard(tmp_path / records.shard_name(1), examples[2:]) == 1
    manifest = {"family": "sd", "resolution": 16, "max_nouns": 4,
                "shards": [{"file": records.shard_name(0), "rows": 2, "records": 2},
                           {"file": records.shard_name(1), "rows": 1, "records": 1}]}
    (tmp_path / records.MANIFEST).write_text(json.dumps(manifest))
    src = data.RecordsSource(tmp_path, family="sd", resolution=16, max_nouns=4)
    assert len(src) == 3
    for i, ex in enumerate(examples):
        got = src[i]
        assert jax.tree.structure(got) == jax.tree.structure(ex)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ex)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="prepared with resolution=16, but the run has resolution=32"):
        data.RecordsSource(tmp_path, resolution=32)
    with pytest.raises(FileNotFoundError, match="ctcal_jax.prepare"):
        data.RecordsSource(tmp_path / "nowhere")
    for text, error in (('{"family": "sd"', "not valid JSON"), ("[1, 2]", r"no \['family', 'max_nouns'")):
        (tmp_path / records.MANIFEST).write_text(text)
        with pytest.raises(ValueError, match=error):
            data.RecordsSource(tmp_path)


PROMPTS = tuple((f"a cat and a dog number {i}", ("cat", "dog")) for i in range(10))


def test_synthetic_is_deterministic(sd, clip):
    c = _config("synthetic", prompts=PROMPTS, resolution=64)
    a, b = data.open_source(c, sd), data.open_source(c, sd)
    assert len(a) == 10
    ex = a[3]
    assert ex["latents"].shape == (8, 8, 4) and ex["latents"].dtype == np.float32
    np.testing.assert_array_equal(ex["latents"], b[3]["latents"])
    np.testing.assert_array_equal(ex["latents"], data.smooth_latents(3, 8, 4))
    assert not np.allclose(ex["latents"], a[4]["latents"])
    ref = nouns.prepare_batch([PROMPTS[3][0]], clip, max_nouns=4, seq_len=77, given=[PROMPTS[3][1]])
    np.testing.assert_array_equal(ex["noun_weights"], ref["noun_weights"][0])
    # Smooth: neighbours differ less than independent noise's (E|x - y| = 2/sqrt(pi) std = 1.13 std).
    assert np.abs(np.diff(ex["latents"], axis=0)).mean() < 0.8 * ex["latents"].std()
    first = [next(data.make_loader(c, sd, global_batch_size=2, seed=1)) for _ in range(2)]
    jax.tree.map(np.testing.assert_array_equal, first[0], first[1])


# --- loader -----------------------------------------------------------------------------------------


def _ids(batch) -> list[int]:
    """Which synthetic row each example is (its latents are seeded by the row index)."""
    return [int(np.flatnonzero(np.all(batch["latents"][i] == LATENTS, axis=(1, 2, 3)))[0])
            for i in range(batch["latents"].shape[0])]


LATENTS = np.stack([data.smooth_latents(i, 8, 4) for i in range(10)])


def test_loader_shards_hosts_disjointly_and_reshuffles_epochs(sd):
    c = _config("synthetic", prompts=PROMPTS, resolution=64)
    hosts = [data.make_loader(c, sd, global_batch_size=4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    epochs = []
    for it in hosts:
        rows = [r for _ in range(5) for r in _ids(next(it))]  # 10 rows: two epochs of this host's 5
        assert next(it)["latents"].shape == (2, 8, 8, 4)
        assert sorted(rows[:5]) == sorted(rows[5:])  # each epoch: the same 5 rows
        assert rows[:5] != rows[5:]  # reshuffled
        epochs.append(set(rows[:5]))
    assert not epochs[0] & epochs[1] and epochs[0] | epochs[1] == set(range(10))
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.make_loader(c, sd, global_batch_size=3, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restore_resumes_exactly(folder, sd, workers):
    c = _config("imagefolder", folder, workers=workers)
    it = data.make_loader(c, sd, global_batch_size=2, seed=5)
    for _ in range(5):
        next(it)
    state = it.get_state()
    skipped = it.skipped_rows
    assert skipped > 0
    json.dumps(state)  # a JSON state: orbax (grain's handler) writes it as is
    after = [next(it) for _ in range(3)]
    it.close()
    fresh = data.make_loader(c, sd, global_batch_size=2, seed=5)
    fresh.set_state(state)
    assert fresh.skipped_rows == skipped
    for want in after:
        jax.tree.map(np.testing.assert_array_equal, next(fresh), want)
    assert fresh.skipped_rows == it.skipped_rows
    fresh.close()
    if workers:  # worker processes change nothing but speed
        plain = data.make_loader(_config("imagefolder", folder), sd, global_batch_size=2, seed=5)
        for _ in range(5):
            next(plain)
        jax.tree.map(np.testing.assert_array_equal, next(plain), after[0])


def test_orbax_checkpoint_manager_round_trips_the_iterator(folder, sd, tmp_path):
    c = _config("imagefolder", folder)
    it = data.make_loader(c, sd, global_batch_size=2, seed=5)
    for _ in range(4):
        next(it)
    saved_skipped = it.skipped_rows
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        # grain's handler is synchronous: the state is taken before save() returns, so the trainer
        # may go on drawing batches while orbax finishes an async save.
        want = [next(it) for _ in range(2)]
        manager.wait_until_finished()
    fresh = data.make_loader(c, sd, global_batch_size=2, seed=5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored["data"] is fresh and fresh.skipped_rows == saved_skipped
    for w in want:
        jax.tree.map(np.testing.assert_array_equal, next(fresh), w)
    assert fresh.skipped_rows == it.skipped_rows
