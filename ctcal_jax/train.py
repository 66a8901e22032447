r"""The trainer: `python -m ctcal_jax.train --config configs/NAME.py --workdir DIR [--config.key=value ...]`.

One run = one work directory. The first call starts the run; the same command again resumes it from
the last checkpoint (params, optimizer, step, data iterator; the step's randomness is derived from
the seed and the step number), so a run killed at any moment and restarted reproduces the losses of
an uninterrupted one. DIR holds:

    config.json                     the resolved config (a resumed run must match it)
    metrics.jsonl, tensorboard/     one row per logged step (`step`, `loss`, the loss terms, ...)
    checkpoints/<step>/             orbax checkpoints (async, the newest `keep_checkpoints` kept)
    lora/pytorch_lora_weights.safetensors   the adapters in diffusers format, at every checkpoint
    figures/attention_<step>.png    per-noun maps, student beside teacher (`sample_every`)
    eval.jsonl, figures/eval_<step>.png   shapes world only (`eval.every`): the exact evaluator's
                                    accuracies per category before the first step, every `eval.every`
                                    steps and at the end, and one sample per category with its
                                    nouns' attention overlaid (`ctcal_jax.evaluation`)

SIGTERM (preemption) saves a checkpoint at the current step and exits with status 143. A NaN or Inf
metric stops the run naming the step and the metric; no checkpoint is written after it, so the last
good one stays the newest. Multi-host: `--multihost` calls `jax.distributed.initialize()` (TPU pods,
SLURM); every host runs the same command and reads its own share of the data (`launch/`).
"""

from __future__ import annotations

import json
import logging as pylogging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from conversion import export_lora
from conversion import pipeline as pipeline_io
from ctcal_jax import builder, cli, data, evaluation
from ctcal_jax import config as config_lib
from ctcal_jax.atomic import atomic_write
from ctcal_jax.checkpoints import Checkpoints
from ctcal_jax.metrics import MetricsWriter, Progress
from ctcal_jax.probe import figure_maker
from ctcal_jax.viz import save_png

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/NAME.py file (its get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory: created, or resumed when it holds a run.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (every host runs this command).")

# Keys a resumed run may change: when and how much it logs, saves and trains, not what it computes.
RESUMABLE_CHANGES = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                     "compilation_cache_dir", "data.workers")
# Key prefixes that do not change what is trained: the sampling settings (`python -m ctcal_jax.sample`)
# and the shapes world's evaluation.
RESUMABLE_PREFIXES = ("sample.", "eval.")


class NonFinite(RuntimeError):
    """A NaN or Inf metric (the run stops; the last good checkpoint stays)."""


def check_config_json(workdir: Path, config_json: dict[str, Any], resuming: bool) -> None:
    """Write `config.json`, or on resume check it against the saved one (`RESUMABLE_CHANGES` and
    `RESUMABLE_PREFIXES` aside). A key the saved file lacks (added to the config since the run
    started) counts as unchanged while it has its default value: a new key's default keeps what
    runs computed before it existed."""
    file = workdir / "config.json"
    if resuming and file.exists():
        saved, now = (traverse_util.flatten_dict(c, sep=".") for c in (json.loads(file.read_text()), config_json))
        defaults = traverse_util.flatten_dict(json.loads(config_lib.base_config().to_json_best_effort()), sep=".")
        changed = sorted(k for k in saved.keys() | now.keys()
                         if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES
                         and not k.startswith(RESUMABLE_PREFIXES)
                         and not (k not in saved and k in defaults and now[k] == defaults[k]))
        if changed:
            raise ValueError(f"{file}: this run was started with a different config ({', '.join(changed)}); "
                             f"resume with the same settings or use a new --workdir")
    if jax.process_index() == 0:
        with atomic_write(file) as f:
            f.write(json.dumps(config_json, indent=2, sort_keys=True))


def to_device(batch: dict[str, Any], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """This host's numpy batch -> global arrays split over the mesh's batch axes."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


@jax.jit
def _watch(bad: dict[str, Any], step: jax.Array, metrics: dict[str, jax.Array]) -> dict[str, Any]:
    """Remember the first step whose metrics are not all finite (and those metrics), on the device:
    NaN is caught at every step without a host read per step."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    first = (bad["step"] < 0) & ~finite
    return {"step": jnp.where(first, step, bad["step"]),
            "metrics": jax.tree.map(lambda old, new: jnp.where(first, new, old), bad["metrics"], metrics)}


def check_finite(bad: dict[str, Any]) -> None:
    """Raise `NonFinite` naming the first bad step and its non-finite metrics, if there was one."""
    bad = jax.device_get(bad)
    if int(bad["step"]) >= 0:
        names = sorted(k for k, v in bad["metrics"].items() if not np.all(np.isfinite(v)))
        values = ", ".join(f"{k}={float(bad['metrics'][k])}" for k in names)
        raise NonFinite(f"non-finite metrics at step {int(bad['step'])}: {values}")


def export_adapters(workdir: Path, params: dict[str, Any]) -> None:
    """The adapters of `params` (the trainable tree; the map autoencoder is not exported) as
    `workdir/lora/pytorch_lora_weights.safetensors`, replaced atomically."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_get(params)
    if jax.process_index() == 0:
        export_lora(workdir / "lora", {c: lp for c, lp in params.items() if c != "ae"})


def write_eval(workdir: Path, step: int, metrics: dict[str, float], figure: Any, writer: MetricsWriter) -> None:
    """One evaluation: a row of `eval.jsonl` (rows of later steps, left by a run killed after them,
    are replaced), `figures/eval_<step>.png`, TensorBoard scalars and image; logs the accuracies."""
    logging.info("step %d  shapes evaluator: %s", step, "  ".join(
        f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if k.endswith("/correct")))
    if jax.process_index() != 0:
        return
    file = workdir / "eval.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines() if line] if file.exists() else []
    rows = [r for r in rows if r["step"] < step] + [{"step": step, **metrics}]
    with atomic_write(file) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    save_png(figure, workdir / "figures" / f"eval_{step:07d}.png")
    writer.write(step, metrics, jsonl=False)
    writer.write_image(step, "eval", figure)


class Preemption:
    """Whether to save and stop after step `n`: SIGTERM was received (one host), or JAX's preemption
    sync point was reached (several hosts: every host answers True at the same step, so all save the
    same step; `jax.distributed.initialize()` installs the SIGTERM notifier that feeds it)."""

    def __init__(self):
        self.multihost = jax.process_count() > 1
        self.received = False
        if not self.multihost:
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_: Any) -> None:
        self.received = True

    def reached(self, step: int) -> bool:
        if self.multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self) -> None:
        if not self.multihost:
            signal.signal(signal.SIGTERM, self.previous)


def train(config: Any, workdir: str | Path) -> dict[str, float]:
    """Run (or resume) `config` in `workdir`; returns the last logged metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    ckpts = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    start = ckpts.latest_step() or 0
    check_config_json(workdir, json.loads(config.to_json_best_effort()), resuming=start > 0)

    mesh = builder.mesh_from_config(config)
    batch_size = builder.global_batch(config, mesh)
    pipe = pipeline_io.load(config, mesh)
    logging.info("loaded %s (%s) onto a %s mesh", pipe.source, pipe.family, dict(mesh.shape))
    run = builder.build(config, pipe, mesh=mesh)
    loader = data.make_loader(config.data, pipe.encoders, global_batch_size=batch_size, seed=config.seed)
    state = run.state
    if start:
        state = ckpts.restore(start, state, run.state_shardings, loader)
        logging.info("resumed %s at step %d", workdir, start)
    draw_figure = figure_maker(config, pipe, run)
    evaluate = evaluation.shapes_evaluator(config, pipe)

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=start if start else None)
    progress = Progress(config.total_steps, initial=start, enabled=jax.process_index() == 0)
    rng = jax.random.key(config.seed)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    bad = {"step": jnp.int32(-1), "metrics": None}
    preemption = Preemption()
    last: dict[str, float] = {}
    tick, tick_step = time.perf_counter(), start
    try:
        if evaluate is not None and start == 0:
            write_eval(workdir, 0, *evaluate(state["params"]), writer)
        for step in range(start, config.total_steps):
            batch = to_device(next(loader), batch_sharding)
            state, metrics = run.step(state, batch, rng)
            if bad["metrics"] is None:
                bad["metrics"] = jax.tree.map(jnp.zeros_like, metrics)
            bad = _watch(bad, jnp.int32(step + 1), metrics)
            done = step + 1
            final = done == config.total_steps
            preempted = preemption.reached(done)
            if done % config.log_every == 0 or final or preempted:
                check_finite(bad)
                now = time.perf_counter()
                speed = (done - tick_step) * batch_size / (now - tick)
                tick, tick_step = now, done
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update({"samples_per_s": speed, "data/skipped_rows": loader.skipped_rows})
                writer.write(done, last)
                progress.update(done, last["loss"], speed)
                logging.info("step %d  loss %.5f  %.2f samples/s", done, last["loss"], speed)
            if draw_figure is not None and (done % config.sample_every == 0 or final):
                fig = draw_figure(state["params"])
                if jax.process_index() == 0:
                    (workdir / "figures").mkdir(exist_ok=True)
                    save_png(fig, workdir / "figures" / f"attention_{done:07d}.png")
                    writer.write_image(done, "attention", fig)
            if evaluate is not None and (done % config.eval.every == 0 or final):
                write_eval(workdir, done, *evaluate(state["params"]), writer)
            if done % config.checkpoint_every == 0 or final or preempted:
                check_finite(bad)
                ckpts.save(done, state, loader)
                export_adapters(workdir, state["params"])
            if preempted:
                ckpts.wait()
                logging.warning("SIGTERM: saved step %d in %s; the same command resumes", done, workdir)
                sys.exit(143)
    finally:
        preemption.close()
        ckpts.wait()
        progress.close()
        writer.close()
    return last


class QuietOrbax(pylogging.Filter):
    """Orbax logs every save in a dozen INFO lines; keep its warnings and errors only."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(QuietOrbax())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.multihost:
        jax.distributed.initialize()
    try:
        train(FLAGS.config, FLAGS.workdir)
    except (NonFinite, ValueError, FileNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")


def run() -> None:
    """Entry point: parse flags (a bad `--config` file or override is a one-line error), then train."""
    argv = cli.parse_flags(sys.argv, ["config", "workdir"])
    app.run(main, argv=argv, flags_parser=lambda a: a)


if __name__ == "__main__":
    run()
