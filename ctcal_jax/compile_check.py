r"""Compile a training config's step without its weights, and say whether it fits the device.

    python -m ctcal_jax.compile_check --config configs/NAME.py[:variant] [--config.key=value ...] \
        [--devices N] [--device-memory-gib 80] [--json OUT.json]

The step is the trainer's own: `builder.build(config, conversion.pipeline.abstract(config), mesh=)`
on the config's mesh (`mesh.data` × `mesh.fsdp` over the devices), with `jax.ShapeDtypeStruct`
weights read from the pipeline's config files only (a local folder, `builtin:tiny-*`, or
`conversion.known` for the public hub ids), so nothing is downloaded or allocated. Its jitted step
is lowered and compiled for this host's backend with a batch of `builder.abstract_batch` (split over
the mesh as the trainer splits it), and a table is printed: the mesh, parameter counts, lowering and
compile time, XLA's `memory_analysis()` per device (argument, output, alias, temp, generated code;
total = argument + output - alias + temp), the activations the remat policy keeps for the backward
pass of one device's micro-batch (traced, so the same on every backend: the part of temp a CPU
compile cannot estimate for a GPU), the compiled FLOPs when the backend has a cost analysis, and
whether the total fits `--device-memory-gib`. `--json OUT` writes the same numbers.

`--devices N` compiles for N CPU devices faked on this host (`jax_num_cpu_devices`, the same as
`XLA_FLAGS=--xla_force_host_platform_device_count=N`; it selects the CPU backend, so it also works
on a GPU host): the sharded program and its per-device memory on any laptop, e.g. FSDP over 8 with
`--devices 8 --config.mesh.data=1 --config.mesh.fsdp=8`. The CPU compiler's temp is a CPU schedule
(docs/benchmarks.md): for the activation memory to trust, run the same command on one host of the
target hardware (compilation only, nothing is allocated). `config.compilation_cache_dir` is
honoured, so a cached compile takes the cache's load time.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from conversion import pipeline as pipeline_io
from ctcal_jax import builder, cli
from ctcal_jax.models import remat as remat_lib
from ctcal_jax.sharding import batch_sharding
from ctcal_jax.train_step import loss_fn

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/NAME.py file (its get_config()).", lock_config=True)
flags.DEFINE_integer("devices", 0, "Compile for this many CPU devices faked on this host (0: this host's "
                     "devices on its default backend).", lower_bound=0)
flags.DEFINE_float("device-memory-gib", 80.0, "The memory of one device, GiB: does the step's total fit?")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")

GIB = 2.0 ** 30


def count(tree: Any) -> int:
    """Elements in a pytree of arrays or `jax.ShapeDtypeStruct`s."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def nbytes(tree: Any) -> int:
    """Bytes of a pytree of arrays or `jax.ShapeDtypeStruct`s (unsharded)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes of one device's shards of `tree` under `shardings` (the largest shard per leaf)."""
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def flops_of(compiled: Any) -> float | None:
    """A compiled or lowered program's FLOPs (XLA's cost analysis), None where the backend has none."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):  # older jax: one dict per program
            cost = cost[0]
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 — a backend without cost analysis still gets its memory table
        return None


def memory_of(compiled: Any) -> dict[str, int] | None:
    """XLA's `memory_analysis()` of the compiled (per-device) program, with the total it needs."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    out = {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
           "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
           "generated_code_bytes": mem.generated_code_size_in_bytes}
    # Aliased outputs (the donated state) reuse their arguments' buffers.
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def kept_per_device(config: Any, pipe: Any, run: builder.Run, batch_size: int, devices: int) -> tuple[int, int]:
    """The bytes autodiff keeps from the forward pass for the backward (`models.remat.kept_bytes` of
    the loss w.r.t. the trainable tree) for one device's micro-batch, and that micro-batch's size:
    what the remat policy keeps on any backend, before a compiler schedules it."""
    per_device = max(batch_size // (config.optim.accum_steps * devices), 1)
    micro = builder.abstract_batch(config, pipe, per_device)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.frozen)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.state["params"])
    rng = jax.random.key(config.seed)

    def loss(trainable, frozen, batch):
        frozen, batch = jax.lax.stop_gradient((frozen, batch))
        return loss_fn(run.family, trainable, frozen, batch, rng)[0]

    return remat_lib.kept_bytes(loss, params, frozen, micro), per_device


def check(config: Any, device_memory_gib: float = 80.0) -> dict[str, Any]:
    """Lower and compile `config`'s train step with abstract weights on all of this process's devices
    (module docstring); returns the table's numbers."""
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    mesh = builder.mesh_from_config(config)
    batch_size = builder.global_batch(config, mesh)
    pipe = pipeline_io.abstract(config)
    run = builder.build(config, pipe, mesh=mesh)
    sharding = batch_sharding(mesh)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                         builder.abstract_batch(config, pipe, batch_size))
    rng = jax.random.key(config.seed)

    start = time.perf_counter()
    lowered = run.step.jitted.lower(run.frozen, run.state, batch, rng)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()

    mem = memory_of(compiled)
    compiled_flops = flops_of(compiled)
    accum = config.optim.accum_steps
    if accum == 1:
        flops = None if compiled_flops is None else compiled_flops * mesh.devices.size
    else:
        # XLA's cost analysis counts a loop's body once, not once per trip, so the compiled count
        # covers 2 of the accumulation scan's micro-batches. Count one micro-batch's step instead
        # (lowered, unpartitioned: the whole mesh's FLOPs) and multiply.
        one = config.copy_and_resolve_references()
        one.optim.accum_steps = 1
        micro = builder.abstract_batch(config, pipe, batch_size // accum)
        step = builder.step_fn(one, pipe, run.state["params"])
        flops = flops_of(jax.jit(step).lower(run.frozen, run.state, micro, rng))
        flops = None if flops is None else flops * accum
    kept, per_device = kept_per_device(config, pipe, run, batch_size, mesh.devices.size)
    device = jax.devices()[0]
    return {
        "pretrained": config.model.pretrained, "family": pipe.family, "objective": config.objective,
        "backend": jax.default_backend(), "device_kind": device.device_kind, "devices": mesh.devices.size,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "global_batch": batch_size,
        "accum_steps": config.optim.accum_steps, "resolution": config.data.resolution,
        "dtype": config.model.dtype, "compute_dtype": config.model.compute_dtype or config.model.dtype,
        "remat": config.model.remat,
        "params": {"frozen": count(run.frozen), "trainable": count(run.state["params"])},
        "param_bytes": {"frozen": nbytes(run.frozen), "trainable": nbytes(run.state["params"])},
        # What the sharding rules leave on each device, before XLA: part of its argument bytes.
        "bytes_per_device": {"frozen": bytes_per_device(run.frozen, run.frozen_shardings),
                             "state": bytes_per_device(run.state, run.state_shardings)},
        "lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
        "memory_per_device": mem,
        "kept_for_backward_per_device": {"bytes": kept, "micro_batch": per_device},
        # The whole step over all devices; and XLA's count of the compiled, partitioned (per-device)
        # program, which counts the accumulation loop's body once.
        "flops_per_step": flops, "compiled_flops_per_device": compiled_flops,
        "device_memory_gib": device_memory_gib,
        "fits": None if mem is None else mem["total_bytes"] <= device_memory_gib * GIB,
        "compilation_cache_dir": config.compilation_cache_dir,
    }


def size(b: float) -> str:
    """Bytes as GiB, with MiB below 1 GiB (the tiny configs)."""
    return f"{b / GIB:.3f} GiB" + (f" [{b / 2 ** 20:.1f} MiB]" if b < GIB else "")


def table(r: dict[str, Any]) -> str:
    """The results as the printed table."""
    mesh = " × ".join(f"{k} {v}" for k, v in r["mesh"].items())
    rows = [
        ("model", f"{r['pretrained']} ({r['family']}, {r['objective']}, {r['dtype']} weights, "
                  f"{r['compute_dtype']} compute, remat {r['remat']})"),
        ("devices", f"{r['devices']} × {r['device_kind']} ({r['backend']})"),
        ("mesh", mesh),
        ("batch", f"{r['global_batch']} global, {r['accum_steps']} accumulation step(s), {r['resolution']} px"),
        ("frozen params", f"{r['params']['frozen']:,} ({size(r['param_bytes']['frozen'])} unsharded)"),
        ("trainable params", f"{r['params']['trainable']:,} ({size(r['param_bytes']['trainable'])})"),
        ("frozen / device", f"{size(r['bytes_per_device']['frozen'])} (by the sharding rules)"),
        ("train state / device", f"{size(r['bytes_per_device']['state'])} (params + optimizer)"),
        ("lowering", f"{r['lower_s']:.1f} s"),
        ("compile", f"{r['compile_s']:.1f} s" + ("  (compilation cache on)" if r["compilation_cache_dir"] else "")),
    ]
    mem = r["memory_per_device"]
    if mem is None:
        rows.append(("memory per device", "the backend gives no memory analysis"))
    else:
        for name in ("argument", "output", "alias", "temp", "generated_code"):
            rows.append((f"{name.replace('_', ' ')} / device", size(mem[name + "_bytes"])))
        rows.append(("total / device", f"{size(mem['total_bytes'])} = argument + output - alias + temp"))
    kept = r["kept_for_backward_per_device"]
    rows.append(("kept / device", f"{size(kept['bytes'])} (what the remat policy keeps for one micro-batch "
                                            f"of {kept['micro_batch']}, on any backend)"))
    flops, per_device = r["flops_per_step"], r["compiled_flops_per_device"]
    if flops is None:
        rows.append(("FLOPs / step", "no cost analysis on this backend"))
    elif r["accum_steps"] == 1:
        rows.append(("FLOPs / step", f"{flops:.4g} in all, {per_device:.4g} per device (compiled step)"))
    else:
        rows.append(("FLOPs / step", f"{flops:.4g} in all = {r['accum_steps']} × one micro-batch's step; "
                                     f"{flops / r['devices']:.4g} per device"))
        if per_device is not None:
            rows.append(("compiled FLOPs", f"{per_device:.4g} per device: XLA counts the accumulation loop's "
                                           "body once"))
    if r["fits"] is not None:
        rows.append((f"fits {r['device_memory_gib']:g} GiB", "yes" if r["fits"] else "NO"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.devices:
        # Before any backend starts; jax raises if one already has.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    try:
        results = check(FLAGS.config, FLAGS["device-memory-gib"].value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    results["command"] = shlex.join(["python", "-m", "ctcal_jax.compile_check", *sys.argv[1:]])
    print(table(results), flush=True)
    if FLAGS.json:
        out = Path(FLAGS.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))


def run() -> None:
    """Entry point: parse flags (a bad `--config` file or override is a one-line error), then check."""
    argv = cli.parse_flags(sys.argv, ["config"])
    app.run(main, argv=argv, flags_parser=lambda a: a)


if __name__ == "__main__":
    run()
