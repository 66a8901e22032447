"""Bad rows: rows of a data set that cannot become an example (a missing or unreadable image, an empty
prompt, an image smaller than the training resolution, a malformed metadata line).

`on_bad_row="skip"` (the default): a source returns the marker `{SKIPPED: reason}` in place of the
example; the loader drops it and counts it (`loader.BatchIterator.skipped_rows`, part of the
checkpointed iterator state), so the trainer can log how many rows a run has lost.
`on_bad_row="fail"`: the `BadRow` (a ValueError naming file, line, file_name and reason) is raised.
"""

from __future__ import annotations

from typing import Any, Literal

OnBadRow = Literal["skip", "fail"]

# Key of the marker a source returns for a skipped row; its value says why.
SKIPPED = "skipped_row"


class BadRow(ValueError):
    """A row that cannot become an example; the message names where it is and why."""

    def __init__(self, file: str, line: int, file_name: str | None, reason: str):
        self.file, self.line, self.file_name, self.reason = file, line, file_name, reason
        super().__init__(f"{file} line {line} (file_name {file_name!r}): {reason}")

    def __reduce__(self):
        # Rebuilt from its fields when raised in a grain worker process and re-raised in the trainer.
        return BadRow, (self.file, self.line, self.file_name, self.reason)


def check_policy(on_bad_row: str) -> OnBadRow:
    """`on_bad_row`, or ValueError when it is neither "skip" nor "fail"."""
    if on_bad_row not in ("skip", "fail"):
        raise ValueError(f"on_bad_row={on_bad_row!r}: expected 'skip' or 'fail'")
    return on_bad_row  # type: ignore[return-value]


def handle(error: BadRow, on_bad_row: OnBadRow) -> dict[str, Any]:
    """The skip marker for `error`, or `error` raised when the policy is "fail"."""
    if on_bad_row == "fail":
        raise error
    return {SKIPPED: str(error)}


def is_skipped(example: dict[str, Any]) -> bool:
    """Whether `example` is a skip marker rather than an example."""
    return SKIPPED in example
