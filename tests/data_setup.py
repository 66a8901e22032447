"""Tiny image folders for the data tests: every kind of bad row, a dictionary tagger."""

import functools
import json

import numpy as np
from PIL import Image

from tiny import tag_words

LEXICON = {"cat": "NOUN", "dog": "NOUN", "sofa": "NOUN", "car": "NOUN", "red": "ADJ", "boat": "NOUN",
           "lake": "NOUN", "bird": "NOUN", "tree": "NOUN", "left": "NOUN"}
RES = 16


tagger = functools.partial(tag_words, LEXICON)  # picklable: grain's worker processes run it


def image(width: int, height: int, seed: int) -> Image.Image:
    """Seeded random RGB pixels."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), np.uint8))


# (metadata row, image written under its file_name: (width, height, format) or None). Rows 0, 1, 7, 8
# are good; the others are each one kind of bad row.
ROWS = [
    ({"file_name": "0.png", "text": "a cat and a dog"}, (24, 16, "PNG")),
    ({"file_name": "1.png", "text": "a red car", "nouns": ["car"], "reward": 0.25}, (40, 20, "PNG")),
    ({"file_name": "missing.png", "text": "a boat"}, None),
    ({"file_name": "3.jpg", "text": "a bird in a tree"}, (32, 32, "TRUNCATED")),
    ({"file_name": "4.png", "text": "  "}, (16, 16, "PNG")),
    ({"file_name": "5.png", "text": "a boat on a lake"}, (12, 30, "PNG")),
    ('{"file_name": "6.png", "text": "a cat"', (16, 16, "PNG")),  # malformed JSON
    ({"file_name": "7.png", "text": "a dog on the left"}, (16, 50, "PNG")),
    ({"file_name": "8.png", "text": "a boat on a lake"}, (33, 17, "PNG")),
]
GOOD = [0, 1, 7, 8]


def write_folder(folder, rows=ROWS):
    """`rows` as `folder/metadata.jsonl` (a blank line after the fourth) and their images."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (meta, spec) in enumerate(rows):
        lines.append(meta if isinstance(meta, str) else json.dumps(meta))
        if spec is None:
            continue
        name = meta["file_name"] if isinstance(meta, dict) else f"{i}.png"
        width, height, kind = spec
        if kind == "TRUNCATED":
            image(width, height, i).save(folder / name, "JPEG")
            raw = (folder / name).read_bytes()
            (folder / name).write_bytes(raw[: len(raw) // 2])
        else:
            image(width, height, i).save(folder / name, kind)
    # A blank line is not a row.
    (folder / "metadata.jsonl").write_text("\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n")
    return folder


LINES = [1, 2, 3, 4, 6, 7, 8, 9, 10]  # file line of each row (the blank line is line 5)


