"""Property-based tests (hypothesis) of the parsers users feed files and strings into: LoRA keys of
every supported format and LoRA files, safetensors headers, `metadata.jsonl` rows, prompts in any
Unicode through tokenization and noun selection.

The property everywhere: the input is accepted, or refused with a `ValueError` (`FileNotFoundError`
for a missing file) whose one-line message names the file, key or field; never a KeyError,
IndexError, TypeError, struct.error or JSON error from inside the parser.
"""

import json
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conversion import files, import_lora
from conversion import lora as lora_files
from ctcal_jax import nouns
from ctcal_jax.data import imagefolder
from tests.tiny import real_clip_tokenizer

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(message: str, *names: str) -> None:
    """A clear error: one line of at most a few hundred characters (plus what it quotes) naming `names`."""
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)


# --- LoRA keys -----------------------------------------------------------------------------------

MODULE_WORD = st.sampled_from(sorted(lora_files._MODULE_WORDS) + ["attn1", "attn2", "ff", "net", "proj", "0", "1",
                                                                   "12", "x", "", "_", "lora", "weight"]
                              # FLUX.1 under BFL's names
                              + ["double_blocks", "single_blocks", "img_attn", "txt_mlp", "qkv", "linear1", "img_in",
                                 "final_layer", "adaLN_modulation", "mod", "lin", "in_layer"])
PREFIXES = [*lora_files._KOHYA_PREFIXES, *(c + "." for c in lora_files.COMPONENTS), "vae.", "", "lora_",
            *lora_files._ORIGINAL_PREFIXES]
TAILS = [*lora_files._KOHYA_TAILS, *(t.lstrip(".") for t in lora_files._DIFFUSERS_TAILS), "lora_magnitude_vector",
         "hada_w1_a", "weight", "", "alpha.alpha"]


@st.composite
def lora_keys(draw) -> str:
    """Keys near the supported formats (prefix + module + tail) and arbitrary text."""
    if draw(st.booleans()):
        return draw(st.text(max_size=40))
    prefix = draw(st.sampled_from(PREFIXES))
    sep = "_" if prefix.startswith("lora_") else "."
    module = sep.join(draw(st.lists(MODULE_WORD, max_size=6)))
    return f"{prefix}{module}.{draw(st.sampled_from(TAILS))}"


@settings(max_examples=300, **SETTINGS)
@given(lora_keys())
def test_lora_key_parsing_never_crashes(key):
    parsed = lora_files._parse_key(key)
    if parsed is not None:
        component, module, part = parsed
        assert component in lora_files.COMPONENTS and part in ("A", "B", "alpha")
        assert isinstance(module, str)


@settings(max_examples=200, **SETTINGS)
@given(st.text(alphabet="ab_0123456789", max_size=30))
def test_kohya_module_split_keeps_the_words(name):
    module = lora_files._kohya_module(name)
    assert module.replace(".", "_") == name


SHAPES = st.lists(st.integers(0, 5), max_size=3).map(tuple)


@settings(max_examples=60, **SETTINGS)
@given(keys=st.lists(lora_keys(), min_size=1, max_size=6, unique=True), data=st.data())
def test_import_lora_on_random_files(keys, data):
    tensors = {k: np.full(data.draw(SHAPES), data.draw(st.floats(allow_nan=True, width=32)), np.float32)
               for k in keys}
    metadata = data.draw(st.one_of(st.none(), st.just({"lora_adapter_metadata": data.draw(JSON_TEXT)})))
    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "lora.safetensors"
        files.write_safetensors(file, tensors, metadata)
        try:
            import_lora(file)
        except ValueError as e:
            one_line(str(e), str(file))
            assert len(str(e)) < 2000, str(e)


@settings(max_examples=60, **SETTINGS)
@given(layer=st.sampled_from(["lora_unet_single_blocks_0_linear1", "diffusion_model.double_blocks.1.txt_attn.qkv",
                              "final_layer.adaLN_modulation.1", "lora_unet_img_in"]),
       tails=st.lists(st.sampled_from(["lora_down.weight", "lora_up.weight", "lora_A.weight", "alpha"]), min_size=1,
                      max_size=3, unique=True),
       data=st.data())
def test_import_flux_original_layers_of_any_shape(layer, tails, data):
    """Fused FLUX layers (split, block-diagonal detection, row swap) with tensors of any shape and value."""
    tensors = {f"{layer}.{t}": np.full(data.draw(st.lists(st.integers(0, 14), max_size=3).map(tuple)),
                                       data.draw(st.sampled_from([0.0, 1.0, np.nan])), np.float32) for t in tails}
    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "lora.safetensors"
        files.write_safetensors(file, tensors)
        try:
            out = import_lora(file)
        except ValueError as e:
            one_line(str(e), str(file))
            return
        assert list(out) == ["transformer"]


@settings(max_examples=60, **SETTINGS)
@given(config=st.dictionaries(st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                                               "use_dora", "target_modules"]),
                              st.one_of(st.integers(-2, 8), st.floats(), st.text(max_size=5), st.booleans(),
                                        st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text())),
                                        st.lists(st.integers(), max_size=2))),
       alpha=st.one_of(st.none(), st.floats(width=32), st.lists(st.floats(width=32), max_size=2)))
def test_import_lora_peft_metadata_and_alphas(config, alpha):
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{module}.lora_A.weight": np.ones((4, 8), np.float32),
               f"{module}.lora_B.weight": np.ones((8, 4), np.float32)}
    if alpha is not None:
        tensors[f"{module}.alpha"] = np.asarray(alpha, np.float32)
    metadata = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "lora.safetensors"
        files.write_safetensors(file, tensors, metadata)
        try:
            out = import_lora(file)
        except ValueError as e:
            one_line(str(e), str(file))
            return
        (adapter,) = lora_files.lora.adapters(out["unet"]).values()
        assert np.isfinite(lora_files.lora.alpha(adapter))


# --- safetensors headers -------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=10)
JSON_TEXT = st.one_of(JSON_VALUES.map(json.dumps), st.text(max_size=30))
DTYPES = st.sampled_from([*files._DTYPES, "F4", "", "f32"])


@st.composite
def tensor_infos(draw):
    """A header entry: mostly well-formed, with any field replaced by junk now and then."""
    info = {"dtype": draw(DTYPES), "shape": draw(st.lists(st.integers(-2, 2**40), max_size=3)),
            "data_offsets": draw(st.lists(st.integers(-8, 2**62), min_size=2, max_size=2))}
    for field in draw(st.lists(st.sampled_from(sorted(info)), max_size=2)):
        if draw(st.booleans()):
            info.pop(field, None)
        else:
            info[field] = draw(JSON_VALUES)
    return info if draw(st.integers(0, 9)) else draw(JSON_VALUES)


@st.composite
def safetensors_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "header", "valid-mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "header":
        header = draw(st.dictionaries(st.text(max_size=6), tensor_infos(), max_size=3))
        if draw(st.booleans()):
            header["__metadata__"] = draw(JSON_VALUES)
        blob = json.dumps(header).encode() if draw(st.integers(0, 4)) else draw(st.binary(max_size=20))
        size = len(blob) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
        return struct.pack("<Q", size) + blob + draw(st.binary(max_size=64))
    with tempfile.TemporaryDirectory() as d:
        files.write_safetensors(Path(d) / "t.safetensors", {"a": np.ones((2, 3), np.float16), "b": np.float32(1)},
                                {"format": "pt"})
        good = bytearray((Path(d) / "t.safetensors").read_bytes())
    cut = draw(st.integers(0, len(good)))
    if draw(st.booleans()):
        return bytes(good[:cut])
    good[cut % len(good)] = draw(st.integers(0, 255))
    return bytes(good)


@settings(max_examples=300, **SETTINGS)
@given(safetensors_bytes())
def test_read_safetensors_on_any_bytes(blob):
    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "x.safetensors"
        file.write_bytes(blob)
        try:
            tensors, metadata = files.read_safetensors(file)
        except ValueError as e:
            one_line(str(e), str(file))
            return
        assert isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        for name, t in tensors.items():
            assert isinstance(name, str) and isinstance(t, np.ndarray)
            np.asarray(t).sum()  # every byte it claims lies in the file


# --- metadata.jsonl rows -------------------------------------------------------------------------

ROW_FIELDS = st.fixed_dictionaries({}, optional={
    "file_name": st.one_of(st.just("0.png"), st.text(max_size=10), JSON_VALUES),
    "text": st.one_of(st.text(max_size=30), JSON_VALUES),
    "nouns": st.one_of(st.lists(st.text(max_size=8), max_size=3), JSON_VALUES),
    "reward": st.one_of(st.floats(), st.integers(-2**1100, 2**1100), JSON_VALUES),
})
LINES = st.one_of(ROW_FIELDS.map(json.dumps), JSON_TEXT, st.binary(max_size=30))


@settings(max_examples=200, **SETTINGS)
@given(lines=st.lists(LINES, min_size=1, max_size=4), bom=st.booleans())
def test_metadata_rows_parse_or_are_bad(tmp_path_factory, lines, bom):
    folder = tmp_path_factory.mktemp("rows")
    (folder / "0.png").write_bytes(b"")
    raw = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines)
    (folder / imagefolder.METADATA).write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw)
    rows = imagefolder.read_metadata(folder)
    for row in rows:
        if row.bad is None:
            assert isinstance(row.file_name, str) and (folder / row.file_name).is_file()
            assert isinstance(row.prompt, str) and row.prompt.strip()
            row.prompt.encode("utf-8")  # no lone surrogates reach the tokenizers
            assert row.reward is None or np.isfinite(row.reward)
            assert row.given is None or all(isinstance(g, str) and g.strip() for g in row.given)
        else:
            one_line(row.bad)


# --- prompts in any Unicode ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    return real_clip_tokenizer()


UPOS = st.sampled_from(["NOUN", "PROPN", "ADJ", "VERB", "X"])


@settings(max_examples=150, **SETTINGS)
@given(prompt=st.text(max_size=120), data=st.data())
def test_noun_groups_for_any_prompt_and_tagger_output(clip, prompt, data):
    n = len(prompt)
    spans = data.draw(st.lists(st.tuples(st.integers(-3, n + 3), st.integers(-3, n + 3)), max_size=5))
    words = [(prompt[max(s, 0):max(e, 0)], data.draw(UPOS), s, e) for s, e in spans]
    max_length = data.draw(st.sampled_from([None, 1, 2, 5, 77]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = nouns.noun_token_groups(prompt, clip, lambda p: words, max_length=max_length)
    except ValueError as e:
        one_line(str(e))
        return
    limit = max_length or 77
    assert all(g and all(0 <= i < limit for i in g) for g in groups)
    nouns.group_weights(groups, 4, limit)


GIVEN_ITEMS = st.one_of(st.text(max_size=8), st.tuples(st.integers(-2, 40), st.integers(-2, 40)),
                        st.lists(st.integers(-2, 40), max_size=3), st.integers(), st.none(), st.floats())


@settings(max_examples=150, **SETTINGS)
@given(prompt=st.text(max_size=60), given=st.lists(GIVEN_ITEMS, max_size=4), data=st.data())
def test_given_nouns_for_any_prompt(clip, prompt, given, data):
    if data.draw(st.booleans()) and prompt.split():  # words that are there, too
        given = given + [data.draw(st.sampled_from(prompt.split()))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = nouns.noun_token_groups(prompt, clip, given=given)
    except ValueError as e:
        one_line(str(e), "given")
        return
    assert all(g and all(0 <= i < 77 for i in g) for g in groups)
    assume(groups)
    nouns.prepare_batch([prompt], clip, given=[given], max_nouns=2)
