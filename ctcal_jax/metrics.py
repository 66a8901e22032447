"""The trainer's host-side logging: `metrics.jsonl`, TensorBoard event files and a progress bar.

Only process 0 writes (`enabled=jax.process_index() == 0` in the trainer); on other processes every
method is a no-op, so the calling code needs no `if`. Values arrive here already on the host: the
trainer fetches its metrics at log steps only (STYLE.md, host discipline).

Work-directory layout:
  workdir/metrics.jsonl  one JSON object per logged step: `{"step": 100, "loss": 0.1234, ...}`
  workdir/tensorboard/   TensorBoard event files (tensorboardX, no TensorFlow needed)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from ctcal_jax import viz
from ctcal_jax.atomic import atomic_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _json_value(value: Any) -> int | float | str:
    """A scalar as JSON can hold it: ints exact, floats to 7 significant digits, NaN/Inf as strings.

    Seven digits is float32's precision: metrics come off the device as float32, and printing them
    widened to float64 (0.1 -> 0.10000000149011612) would only add noise digits. Strict JSON has no
    NaN or Infinity, so those are written "nan", "inf", "-inf" (`float()` reads them back) rather
    than dropped: a NaN at a given step is exactly what the log must show.
    """
    v = np.asarray(value)
    if v.size != 1:
        raise ValueError(f"a metric must be a scalar, got shape {v.shape}")
    v = v.reshape(()).item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"a metric must be an int or a float, got {type(v).__name__}: {v!r}")
    if isinstance(v, int):
        return v
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return float(f"{v:.7g}")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Rewrite `path` (atomically) without rows whose step is above `last_step`.

    A line that does not parse (the half-written last line of a killed run) is dropped too.
    """
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                kept.append(line.rstrip("\n") + "\n")  # verbatim: the row is not ours to reformat
    with atomic_write(path) as f:
        f.writelines(kept)


class MetricsWriter:
    """Scalars to `workdir/metrics.jsonl` and TensorBoard; images to TensorBoard.

    Resuming: a run saves a checkpoint every so many steps but logs more often, so a run killed at
    step k + j (checkpoint at k) has already logged the steps after k, and the resumed run replays
    and logs them again. `resume_step=k` (the step of the restored checkpoint) drops the stale rows
    with step > k from metrics.jsonl before appending, so the file holds each step once, from the
    run that reached the final state. TensorBoard gets the same cut through tensorboardX's
    `purge_step=k + 1`: its first event tells TensorBoard to hide older events from step k + 1 on.

    Args:
      workdir: the run's work directory (created if missing).
      enabled: False on every process but 0; then nothing is created or written.
      resume_step: the step of the checkpoint the run resumed from; None for a fresh run.
    """

    def __init__(self, workdir: str | os.PathLike[str], enabled: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            _truncate_jsonl(self.path, resume_step)
        # Line-buffered: each row reaches the file when written, so a killed run keeps its log.
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        self._tb = SummaryWriter(
            logdir=str(Path(workdir) / TENSORBOARD_DIR),
            purge_step=None if resume_step is None else resume_step + 1,
            flush_secs=30,
            # tensorboardX names event files by the second and opens them "wb": a second writer
            # in the same second (a fast restart, a test) would erase the first one's events. The
            # sub-second suffix keeps names unique and still sorted by time, which TensorBoard's
            # purge relies on.
            filename_suffix=f".{time.time_ns() % 10**9:09d}",
        )

    def write(self, step: int, scalars: Mapping[str, Any], jsonl: bool = True) -> None:
        """Log `scalars` (name -> host int/float/0-d array) at `step`: one jsonl row (unless `jsonl` is
        False: values with a file of their own) and TensorBoard scalars."""
        if not self.enabled:
            return
        if "step" in scalars:
            raise ValueError("'step' is the row's key; pass it as the step argument")
        values = {name: _json_value(v) for name, v in scalars.items()}
        if jsonl:
            self._file.write(json.dumps({"step": int(step), **values}, allow_nan=False) + "\n")
        for name, v in values.items():
            self._tb.add_scalar(name, float(v), int(step))

    def write_image(self, step: int, tag: str, image: Any) -> None:
        """Log an image (PIL, uint8 or float `[H, W, 3]` in [0, 1]) to TensorBoard under `tag`."""
        if not self.enabled:
            return
        pixels = np.asarray(viz.to_pil(image))  # uint8: tensorboardX would rescale floats itself
        self._tb.add_image(tag, pixels, int(step), dataformats="HWC")

    def flush(self) -> None:
        """Push pending rows and events to disk (the trainer calls it at checkpoints).

        metrics.jsonl is complete on disk after every `write` anyway. TensorBoard events go through
        tensorboardX's writer thread: `flush` writes out what that thread has taken from its queue,
        which lags `add_*` by moments; `close` drains the queue fully.
        """
        if not self.enabled:
            return
        self._file.flush()
        self._tb.flush()

    def close(self) -> None:
        """Flush and close both outputs; later calls are no-ops."""
        if not self.enabled or self._file is None:
            return
        self._file.close()
        self._tb.close()
        self._file = self._tb = None
        self.enabled = False

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """A tqdm bar over training steps (or sampled images), shown only on an interactive terminal.

    On a non-TTY stderr (a batch job, a pod's log) a bar's carriage-return updates would fill the log
    with partial lines, so nothing is printed: the trainer logs the same numbers through absl logging.

    Args:
      total: the last step of the run.
      initial: the step the run starts (or resumes) from.
      enabled: False on every process but 0.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, unit: str = "step") -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm.tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True,
                                  file=sys.stderr)

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        """Move the bar to `step` and show the latest loss and throughput."""
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"loss={float(loss):.4g}, {float(samples_per_s):.3g} samples/s",
                                  refresh=False)
        self._bar.update(step - self._bar.n)

    def advance(self, n: int, note: str = "") -> None:
        """Move the bar forward by `n` units (the sampler: images) and show `note`."""
        if self._bar is None:
            return
        self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        """Leave the bar's last state on the terminal."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
