"""Noun selection: Stanza `Document`s built from CoNLL-U, pluggable taggers, given nouns, the blacklist,
adjectives, and word -> token positions with the real CLIP BPE and a SentencePiece (T5) tokenizer."""

import io
import os
import warnings

import numpy as np
import pytest
from stanza.utils.conll import CoNLL

from ctcal_jax import nouns
from tests.tiny import real_clip_tokenizer


@pytest.fixture(scope="module")
def clip():
    return real_clip_tokenizer(pad_token="!")  # SD 2.x's CLIP tokenizer


def tagged(prompt, words):
    """`(word, upos, start, end)` with offsets found left to right in `prompt`."""
    out, cursor = [], 0
    for word, upos in words:
        start = prompt.index(word, cursor)
        cursor = start + len(word)
        out.append((word, upos, start, cursor))
    return out


def conll_doc(prompt, words):
    """A Stanza `Document` read from CoNLL-U text whose MISC column carries the character offsets."""
    lines = [f"# text = {prompt}"]
    for i, (word, upos, start, end) in enumerate(tagged(prompt, words), 1):
        lines.append(f"{i}\t{word}\t{word.lower()}\t{upos}\t_\t_\t0\tdep\t_\tstart_char={start}|end_char={end}")
    return CoNLL.conll2doc(input_str="\n".join(lines) + "\n\n")


GIRAFFE = "A giraffe next to a traffic light, a hot-dog and a teddy bear,"
GIRAFFE_TAGS = [("A", "DET"), ("giraffe", "NOUN"), ("next", "ADJ"), ("to", "ADP"), ("a", "DET"),
                ("traffic", "NOUN"), ("light", "NOUN"), (",", "PUNCT"), ("a", "DET"), ("hot-dog", "NOUN"),
                ("and", "CCONJ"), ("a", "DET"), ("teddy", "NOUN"), ("bear", "NOUN"), (",", "PUNCT")]


def test_clip_groups_from_stanza_document(clip):
    # <sot> a giraffe next to a traffic light , a hot - dog and a teddy bear , <eot>
    #   0   1    2     3   4  5    6      7   8 9  10 11  12  13 14  15   16  17
    assert clip.tokenize(GIRAFFE)[9:12] == ["hot</w>", "-</w>", "dog</w>"]
    doc = conll_doc(GIRAFFE, GIRAFFE_TAGS)
    # Compound nouns ("traffic light", "teddy bear") are one subject with all their tokens.
    assert nouns.noun_token_groups(GIRAFFE, clip, doc) == [[2], [6, 7], [10, 11, 12], [15, 16]]
    assert nouns.noun_token_groups(GIRAFFE, clip, doc, merge_compounds=False) == [
        [2], [6], [7], [10, 11, 12], [15], [16]]


def test_clip_sub_token_splits(clip):
    prompt = "two giraffes eating tiramisu near a fire hydrant"
    assert clip.tokenize(prompt) == ["two</w>", "gira", "ffes</w>", "eating</w>", "ti", "ram", "isu</w>",
                                     "near</w>", "a</w>", "fire</w>", "hydr", "ant</w>"]
    doc = conll_doc(prompt, [("two", "NUM"), ("giraffes", "NOUN"), ("eating", "VERB"), ("tiramisu", "NOUN"),
                             ("near", "ADP"), ("a", "DET"), ("fire", "NOUN"), ("hydrant", "NOUN")])
    assert nouns.noun_token_groups(prompt, clip, doc) == [[2, 3], [5, 6, 7], [10, 11, 12]]


def test_hyphen_split_by_the_tagger_and_multiword_tagger_output(clip):
    # A tagger that splits the hyphen selects only the noun part; one that returns a multi-word
    # noun gets one group holding all its tokens.
    split = tagged(GIRAFFE, [("giraffe", "NOUN"), ("hot", "ADJ"), ("-", "PUNCT"), ("dog", "NOUN")])
    assert nouns.noun_token_groups(GIRAFFE, clip, lambda p: split) == [[2], [12]]
    assert nouns.noun_token_groups(GIRAFFE, clip, lambda p: split, include_adjectives=True) == [[2], [10], [12]]
    whole = tagged(GIRAFFE, [("traffic light", "NOUN"), ("teddy bear", "NOUN")])
    assert nouns.noun_token_groups(GIRAFFE, clip, lambda p: whole) == [[6, 7], [15, 16]]


def test_blacklist_and_propn(clip):
    prompt = "A cat on the left side of the top shelf, Paris in the Corners"
    words = [("A", "DET"), ("cat", "NOUN"), ("on", "ADP"), ("the", "DET"), ("left", "NOUN"), ("side", "NOUN"),
             ("of", "ADP"), ("the", "DET"), ("top", "NOUN"), ("shelf", "NOUN"), (",", "PUNCT"),
             ("Paris", "PROPN"), ("in", "ADP"), ("the", "DET"), ("Corners", "NOUN")]
    # <sot> a cat on the left side of the top shelf , paris in the corners <eot>
    #   0   1  2   3  4    5    6   7  8   9   10   11  12   13  14   15
    doc = conll_doc(prompt, words)
    assert nouns.noun_token_groups(prompt, clip, doc) == [[2], [10], [12]]
    everything = nouns.noun_token_groups(prompt, clip, doc, blacklist=frozenset())
    assert everything == [[2], [5, 6], [9, 10], [12], [15]]  # "left side", "top shelf": compounds
    assert nouns.noun_token_groups(prompt, clip, doc, blacklist={"Cat"}) == [[5, 6], [9, 10], [12], [15]]


def test_adjectives(clip):
    prompt = "a red car and a big blue house"
    doc = conll_doc(prompt, [("a", "DET"), ("red", "ADJ"), ("car", "NOUN"), ("and", "CCONJ"), ("a", "DET"),
                             ("big", "ADJ"), ("blue", "ADJ"), ("house", "NOUN")])
    assert nouns.noun_token_groups(prompt, clip, doc) == [[3], [8]]
    assert nouns.noun_token_groups(prompt, clip, doc, include_adjectives=True) == [[2], [3], [6], [7], [8]]


def test_tagger_callable_returning_document(clip):
    prompt = "a dog"
    assert nouns.noun_token_groups(prompt, clip, lambda p: conll_doc(p, [("a", "DET"), ("dog", "NOUN")])) == [[2]]


def test_given_nouns(clip):
    prompt = "A dog chases a Traffic light and another dog,"
    # <sot> a dog chases a traffic light and another dog , <eot>
    #   0   1  2    3    4    5      6    7     8     9  10
    assert nouns.noun_token_groups(prompt, clip, given=["traffic light", "dog", "dog"]) == [[2], [5, 6], [9]]
    assert nouns.noun_token_groups(prompt, clip, given=[(2, 5), (15, 28)]) == [[2], [5, 6]]
    # Given nouns bypass the blacklist: the data chose them.
    assert nouns.noun_token_groups("the left one", clip, given=["left"]) == [[2]]
    with pytest.raises(ValueError, match="cat"):
        nouns.noun_token_groups(prompt, clip, given=["cat"])
    with pytest.raises(ValueError, match="dog"):
        nouns.noun_token_groups(prompt, clip, given=["dog", "dog", "dog"])


def test_truncated_words_are_dropped_with_a_warning(clip):
    prompt = " ".join(["a"] * 80) + " dog"
    with pytest.warns(UserWarning, match=r"'a a a .{60,80}\.\.\.' is truncated to 77 tokens.*\['dog'\]"):
        assert nouns.noun_token_groups(prompt, clip, given=["dog"]) == []
    with pytest.warns(UserWarning, match=r"'a small dog' is truncated to 3 tokens.*\['dog'\]"):
        assert nouns.noun_token_groups("a small dog", clip, given=["dog"], max_length=3) == []
    # A tagger's nouns past the cut too; nothing dropped, no warning.
    with pytest.warns(UserWarning, match=r"\['dog'\]"):
        assert nouns.noun_token_groups(prompt, clip, lambda p: [("dog", "NOUN", len(p) - 3, len(p))]) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nouns.noun_token_groups("a small dog", clip, given=["dog"]) == [[3]]


def test_missing_stanza_models_error(clip, tmp_path, monkeypatch):
    monkeypatch.setenv("STANZA_RESOURCES_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        nouns.noun_token_groups("a dog", clip)
    msg = str(info.value)
    assert 'stanza.download("en")' in msg and "STANZA_RESOURCES_DIR" in msg and str(tmp_path) in msg
    # The folder this stanza downloads to (1.10+: ~/.cache/stanza/<version>/resources), not ~/stanza_resources.
    from stanza.resources.common import USER_CACHE_DIR

    assert os.path.join(USER_CACHE_DIR, "resources") in msg and "~/stanza_resources" not in msg, msg
    # resources.json without the English models: the same message, Stanza's own error chained.
    (tmp_path / "resources.json").write_text("{}")
    (tmp_path / "en").mkdir()
    with pytest.raises(FileNotFoundError, match="STANZA_RESOURCES_DIR") as info:
        nouns.stanza_pipeline()
    assert info.value.__cause__ is not None


def test_unknown_tagger_name(clip):
    with pytest.raises(ValueError, match="spacy"):
        nouns.noun_token_groups("a dog", clip, tagger="spacy")


# --- T5 SentencePiece ---------------------------------------------------------------------------

CORPUS = ["a photo of a cat and a dog", "a red car next to a blue house", "the giraffe eats leaves",
          "a traffic light on a street corner", "a teddy bear on a bed"] * 50


@pytest.fixture(scope="module")
def t5():
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=35,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=256), sp


def sentencepiece_word_positions(sp, prompt):
    """Oracle from SentencePiece's own pieces: a piece starting with "▁" opens the next word."""
    word = -1
    owner = []
    for piece in sp.encode(prompt, out_type=str):
        word += piece.startswith("▁")
        owner.append(word)
    return [[i for i, w in enumerate(owner) if w == k] for k in range(word + 1)]


@pytest.mark.parametrize("metaspace_only", [False, True])
def test_t5_sentencepiece_word_boundaries(t5, metaspace_only):
    tok, sp = t5
    if metaspace_only:  # a tokenizer.json whose bare "▁" offset is the space before the word
        import copy

        from tokenizers import pre_tokenizers

        tok = copy.deepcopy(tok)
        tok._tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        assert tok("a giraffe", return_offsets_mapping=True)["offset_mapping"][1] == (1, 2)
    prompt = "a giraffe near a teddy bear on a bed"
    pieces = sp.encode(prompt, out_type=str)
    assert tok.convert_ids_to_tokens(tok(prompt)["input_ids"]) == pieces + ["</s>"]
    # "giraffe" is a bare "▁" boundary piece plus sub-pieces; "teddy" starts with a "▁t" piece.
    assert pieces[1:6] == ["▁", "g", "i", "raff", "e"] and pieces[11] == "▁t"
    words = prompt.split()
    doc = conll_doc(prompt, [(w, "NOUN" if w in ("giraffe", "teddy", "bear", "bed") else "X") for w in words])
    per_word = sentencepiece_word_positions(sp, prompt)
    expected = [per_word[i] for i, w in enumerate(words) if w in ("giraffe", "teddy", "bear", "bed")]
    expected[1:3] = [expected[1] + expected[2]]  # "teddy bear" is one compound subject
    groups = nouns.noun_token_groups(prompt, tok, doc)
    assert groups == expected
    assert groups[0] == [1, 2, 3, 4, 5]  # the "▁" piece at position 1 belongs to "giraffe"


def test_t5_nouns_past_sd3s_256_tokens_warn(t5):
    tok, _ = t5
    prompt = "a cat and a dog " * 60 + "near a teddy bear"
    doc = [("cat", "NOUN", 2, 5), ("teddy", "NOUN", len(prompt) - 10, len(prompt) - 5),
           ("bear", "NOUN", len(prompt) - 4, len(prompt))]
    with pytest.warns(UserWarning, match=r"truncated to 256 tokens.*\['teddy bear'\]"):
        groups = nouns.noun_token_groups(prompt, tok, lambda p: doc, max_length=256)
    assert len(groups) == 1  # "cat" only


def test_t5_real_token_mask(t5):
    tok, _ = t5
    mask = nouns.real_token_mask("a bed", tok, 6)  # ▁a ▁ b ed </s> <pad>
    assert tok.convert_ids_to_tokens(tok("a bed")["input_ids"]) == ["▁a", "▁b", "ed", "</s>"]
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0])


# --- Batch arrays ---------------------------------------------------------------------------------


def test_group_weights():
    w = nouns.group_weights([[2], [5, 6], [7, 8, 9]], max_nouns=2, seq_len=10)
    expected = np.zeros((2, 10), np.float32)
    expected[0, 2] = 1.0
    expected[1, 5:7] = 0.5
    np.testing.assert_array_equal(w, expected)


def test_prepare_batch_with_stanza_bulk_call(clip, monkeypatch):
    prompts = ["a red car", "a dog and a cat", "nothing here"]
    tags = {prompts[0]: [("a", "DET"), ("red", "ADJ"), ("car", "NOUN")],
            prompts[2]: [("nothing", "PRON"), ("here", "ADV")]}
    calls = []

    def fake_pipeline(docs):  # the bulk call prepare_batch makes: Documents with text only
        calls.append([d.text for d in docs])
        return [conll_doc(d.text, tags[d.text]) for d in docs]

    monkeypatch.setattr(nouns, "stanza_pipeline", lambda: fake_pipeline)
    batch = nouns.prepare_batch(prompts, clip, max_nouns=3, seq_len=8, given=[None, ["cat", "dog"], None],
                                include_adjectives=True)
    assert calls == [[prompts[0], prompts[2]]]
    w, mask = batch["noun_weights"], batch["token_mask"]
    assert w.shape == (3, 3, 8) and w.dtype == np.float32 and mask.shape == (3, 8) and mask.dtype == bool
    expected = np.zeros((3, 3, 8), np.float32)
    expected[0, 0, 2] = expected[0, 1, 3] = 1.0  # red, car
    expected[1, 0, 2] = expected[1, 1, 5] = 1.0  # dog, cat (prompt order)
    np.testing.assert_array_equal(w, expected)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]])


def test_prepare_batch_needs_seq_len_without_model_max_length(t5):
    from transformers import T5Tokenizer

    with pytest.raises(ValueError, match="seq_len"):
        nouns.prepare_batch(["a bed"], T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)],
                                                   extra_ids=0), given=[["bed"]])
