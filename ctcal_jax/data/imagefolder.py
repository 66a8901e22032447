"""Image folder source: `DIR/metadata.jsonl` beside the images (Hugging Face `imagefolder` and
diffusers' train-script layout).

Each line of `metadata.jsonl` is one row: `{"file_name": "0001.jpg", "text": "a cat on a sofa"}`,
optionally `"reward": 0.8` (GORS weight) and `"nouns": ["cat", "sofa"]` (the nouns, so no tagger
runs). `file_name` is relative to DIR. Blank lines are ignored.

An example: `images` `[R, R, 3]` float32 in [-1, 1] (`images.load_image`, R = resolution) plus
the text arrays (`examples.text_example`). When some row carries a reward, every example has one;
rows without take 1.0 (SPEC §3: weight 1 when the data has none).

Bad rows (`bad_rows`): a line that is not UTF-8, malformed JSON, a missing `file_name`/`text`, an
empty prompt or one with lone surrogates, a reward that is not a finite number, a given noun that is
empty or not a word of the prompt and a missing file are found when the folder is opened (cheap, no
image is read); an unreadable or too-small image when its example is loaded (in grain's worker
processes too). Line numbers count from 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctcal_jax import nouns, text
from ctcal_jax.data import bad_rows
from ctcal_jax.data.examples import text_example, text_side
from ctcal_jax.data.images import UnusableImage, load_image

METADATA = "metadata.jsonl"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of `metadata.jsonl`; `bad` is why it cannot be used (None when it can, so far)."""

    line: int
    file_name: str | None
    prompt: str
    given: tuple[str, ...] | None
    reward: float | None
    bad: str | None = None


def parse_line(raw: str, line: int, folder: Path) -> Row:
    """One metadata line -> `Row`, with `bad` set when a cheap check fails (module docstring)."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        return Row(line, None, "", None, None, f"malformed JSON: {e}")
    if not isinstance(obj, dict):
        return Row(line, None, "", None, None, f"expected a JSON object, got {type(obj).__name__}")
    file_name, prompt = obj.get("file_name"), obj.get("text")
    given, reward = obj.get("nouns"), obj.get("reward")

    def bad(reason: str) -> Row:
        return Row(line, file_name if isinstance(file_name, str) else None, "", None, None, reason)

    if not isinstance(file_name, str) or not file_name:
        return bad("no file_name")
    if not isinstance(prompt, str):
        return bad("no text (prompt)")
    if not prompt.strip():
        return bad("empty prompt")
    if not _is_unicode(prompt):
        return bad(f"text {prompt[:80]!r} holds a lone surrogate (\\ud800-\\udfff escape), not Unicode text")
    if reward is not None and not _finite_number(reward):
        return bad(f"reward {str(reward)[:40]} is not a finite number")
    if given is not None:
        if not isinstance(given, list) or not all(isinstance(g, str) and g.strip() and _is_unicode(g) for g in given):
            return bad(f"nouns {str(given)[:80]} is not a list of non-empty strings")
        try:
            nouns.given_spans(prompt, given)
        except ValueError as e:
            return bad(str(e))
        given = tuple(given)
    if not (folder / file_name).is_file():
        return bad("missing file")
    return Row(line, file_name, prompt, given, None if reward is None else float(reward))


def _finite_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an integer beyond float's range
        return False


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates, which JSON escapes allow and no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_metadata(folder: str | Path) -> list[Row]:
    """Every non-blank line of `folder/metadata.jsonl` as a `Row`, in file order. A line that is not
    UTF-8 is a bad row; a byte-order mark at the start of the file is ignored."""
    folder = Path(folder)
    file = folder / METADATA
    if not file.is_file():
        raise FileNotFoundError(f"{file}: an image folder needs a {METADATA} (one JSON object per line: "
                                '{"file_name": ..., "text": ...})')
    rows = []
    with open(file, "rb") as f:
        for i, data in enumerate(f, start=1):
            try:
                raw = data.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                rows.append(Row(i, None, "", None, None, f"not UTF-8 text ({e})"))
                continue
            if raw.strip():
                rows.append(parse_line(raw, i, folder))
    return rows


class ImageFolderSource:
    """grain random-access source over the rows of an image folder (module docstring).

    Picklable (rows, paths, tokenizers and tagger only), so grain's worker processes load images.
    """

    def __init__(
        self,
        folder: str | Path,
        encoders: text.PromptEncoders,
        *,
        resolution: int,
        max_nouns: int = 16,
        include_adjectives: bool = False,
        tagger: nouns.Tagger = "stanza",
        on_bad_row: str = "skip",
    ):
        self.folder = Path(folder)
        self.encoders = text_side(encoders)
        self.resolution = resolution
        self.text_options = dict(max_nouns=max_nouns, include_adjectives=include_adjectives, tagger=tagger)
        self.on_bad_row = bad_rows.check_policy(on_bad_row)
        self.rows: Sequence[Row] = read_metadata(self.folder)
        if not self.rows:
            raise ValueError(f"{self.folder / METADATA} has no rows")
        self.has_reward = any(r.reward is not None for r in self.rows)
        first_bad = next((r for r in self.rows if r.bad), None)
        if first_bad is not None and self.on_bad_row == "fail":
            raise self._error(first_bad, first_bad.bad)
        if all(r.bad for r in self.rows):
            first = self._error(first_bad, first_bad.bad)
            raise ValueError(f"{self.folder / METADATA}: every row is bad (first: {first})")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The example of row `index`, or a skip marker (`bad_rows`)."""
        row = self.rows[index]
        if row.bad:
            return bad_rows.handle(self._error(row, row.bad), self.on_bad_row)
        try:
            image = load_image(self.folder / row.file_name, self.resolution)
        except (UnusableImage, FileNotFoundError) as e:  # FileNotFoundError: deleted since opening
            return bad_rows.handle(self._error(row, str(e)), self.on_bad_row)
        reward = row.reward if row.reward is not None else (1.0 if self.has_reward else None)
        return {"images": image, **text_example(self.encoders, row.prompt, row.given, reward, **self.text_options)}

    def _error(self, row: Row, reason: str) -> bad_rows.BadRow:
        return bad_rows.BadRow(str(self.folder / METADATA), row.line, row.file_name, reason)

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.folder)!r}, {len(self.rows)} rows, resolution={self.resolution})"
