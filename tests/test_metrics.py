"""ctcal_jax.metrics: metrics.jsonl rows, resume truncation, TensorBoard events read back, Progress."""

from __future__ import annotations

import io
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from ctcal_jax import metrics


def read_events(logdir: Path) -> list[event_pb2.Event]:
    """Every event in `logdir`'s event files, in file order (TFRecord framing, CRCs checked).

    tensorboard (and its reader) is not a dependency; the framing is: u64 length, u32 masked CRC of
    the length, the serialized Event, u32 masked CRC of the data.
    """
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
            events.append(event_pb2.Event.FromString(body))
            pos += 16 + length
    return events


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the scalar summaries in `logdir`."""
    out: dict[str, list[tuple[int, float]]] = {}
    for e in read_events(logdir):
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / metrics.METRICS_FILE).read_text().splitlines()]


def test_rows_and_tensorboard_scalars(tmp_path):
    with metrics.MetricsWriter(tmp_path) as w:
        w.write(10, {"loss": np.float32(0.1), "lr": 5e-5, "samples": np.int64(640)})
        w.write(20, {"loss": 0.123456789, "lr": 5e-5, "samples": 1280})
    assert rows(tmp_path) == [
        {"step": 10, "loss": 0.1, "lr": 5e-05, "samples": 640},  # float32 0.1 written as 0.1
        {"step": 20, "loss": 0.1234568, "lr": 5e-05, "samples": 1280},
    ]
    tb = scalars(tmp_path / metrics.TENSORBOARD_DIR)
    assert set(tb) == {"loss", "lr", "samples"}
    assert [s for s, _ in tb["loss"]] == [10, 20]
    np.testing.assert_allclose([v for _, v in tb["loss"]], [0.1, 0.1234568], rtol=1e-6)
    assert tb["samples"] == [(10, 640.0), (20, 1280.0)]


def test_nan_and_inf_are_logged_not_fatal(tmp_path):
    with metrics.MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "x": -math.inf, "ok": 1.5})
    text = (tmp_path / metrics.METRICS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert rows(tmp_path) == [{"step": 1, "loss": "nan", "grad_norm": "inf", "x": "-inf", "ok": 1.5}]
    tb = scalars(tmp_path / metrics.TENSORBOARD_DIR)
    assert math.isnan(tb["loss"][0][1]) and tb["grad_norm"][0][1] == math.inf and tb["x"][0][1] == -math.inf


def test_bad_values_raise(tmp_path):
    with metrics.MetricsWriter(tmp_path) as w:
        with pytest.raises(ValueError):
            w.write(1, {"loss": np.zeros(3)})
        with pytest.raises(TypeError):
            w.write(1, {"name": "abc"})
        with pytest.raises(ValueError):
            w.write(1, {"step": 3.0})


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    # First run: logs steps 10..50, checkpoints at 30, is killed mid-write at 60.
    with metrics.MetricsWriter(tmp_path) as w:
        for s in range(10, 60, 10):
            w.write(s, {"loss": s / 100})
    with open(tmp_path / metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 60, "lo')
    # Resumed from the checkpoint at 30: replays 40, 50, 60.
    with metrics.MetricsWriter(tmp_path, resume_step=30) as w:
        for s in range(40, 70, 10):
            w.write(s, {"loss": s / 1000})
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [10, 20, 30, 40, 50, 60]
    assert [r["loss"] for r in got] == [0.1, 0.2, 0.3, 0.04, 0.05, 0.06]
    assert sorted(p.name for p in tmp_path.iterdir()) == [metrics.METRICS_FILE, metrics.TENSORBOARD_DIR]
    # TensorBoard: the resumed run's event file opens with a purge at step 31, which TensorBoard
    # uses to hide the first run's events from step 31 on.
    events = read_events(tmp_path / metrics.TENSORBOARD_DIR)  # both runs' files, in name order
    assert [e.step for e in events if e.HasField("session_log")] == [31]
    logged = [(e.step, v.simple_value) for e in events for v in e.summary.value]
    np.testing.assert_allclose(logged, [(s, s / 100) for s in range(10, 60, 10)]
                               + [(s, s / 1000) for s in range(40, 70, 10)], rtol=1e-6)
    session = next(i for i, e in enumerate(events) if e.HasField("session_log"))
    assert all(e.step <= 50 for e in events[:session])  # the purge comes after the first run's events


def test_fresh_writer_appends(tmp_path):
    with metrics.MetricsWriter(tmp_path) as w:
        w.write(1, {"a": 1.0})
    with metrics.MetricsWriter(tmp_path) as w:
        w.write(2, {"a": 2.0})
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]


def test_rows_reach_disk_before_close(tmp_path):
    # A killed run never calls close(); its rows must already be in the file.
    w = metrics.MetricsWriter(tmp_path)
    w.write(5, {"loss": 1.0})
    assert rows(tmp_path) == [{"step": 5, "loss": 1.0}]
    w.flush()
    w.close()
    assert scalars(tmp_path / metrics.TENSORBOARD_DIR) == {"loss": [(5, 1.0)]}
    w.close()  # idempotent
    w.write(6, {"loss": 2.0})  # after close: a no-op, not a crash
    assert len(rows(tmp_path)) == 1


def test_images_reach_tensorboard(tmp_path):
    image = np.zeros((6, 8, 3), np.float32)
    image[..., 0] = 1.0
    with metrics.MetricsWriter(tmp_path) as w:
        w.write_image(7, "maps", image)
    (value,) = [v for e in read_events(tmp_path / metrics.TENSORBOARD_DIR) for v in e.summary.value]
    assert value.tag == "maps"
    assert (value.image.height, value.image.width, value.image.colorspace) == (6, 8, 3)
    png = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
    assert png.shape == (6, 8, 3) and np.all(png == [255, 0, 0])


def test_disabled_writer_creates_nothing(tmp_path):
    w = metrics.MetricsWriter(tmp_path / "run", enabled=False, resume_step=3)
    w.write(1, {"loss": 1.0})
    w.write_image(1, "x", np.zeros((2, 2, 3)))
    w.flush()
    w.close()
    assert not (tmp_path / "run").exists()


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_silent_off_a_terminal(monkeypatch, capsys, enabled):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    with metrics.Progress(100, initial=10, enabled=enabled) as p:
        p.update(20, loss=0.5, samples_per_s=12.0)
    assert err.getvalue() == ""
    assert capsys.readouterr().out == ""


def test_progress_bar_on_a_terminal(monkeypatch):
    err = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    with metrics.Progress(100, initial=10) as p:
        p.update(40, loss=0.123456, samples_per_s=12.34)
    out = err.getvalue()
    assert "40/100" in out and "loss=0.1235" in out and "12.3 samples/s" in out
    disabled = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", disabled)
    with metrics.Progress(100, enabled=False) as p:  # process != 0: no bar even on a terminal
        p.update(40, loss=0.1, samples_per_s=1.0)
    assert disabled.getvalue() == ""
