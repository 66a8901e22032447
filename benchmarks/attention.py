"""Extra time of capturing attention maps, and of TACA, relative to a plain forward: ctcal_jax vs the
PyTorch explicit-softmax way, on the same machine in one run.

    python benchmarks/attention.py --preset cpu-small --json out/attention.json
    python benchmarks/attention.py --preset sd21-512  --json out/attention.json   # GPU host
    python benchmarks/attention.py --preset sd3m-1024 --json out/attention.json   # GPU host

What runs, per model (the same random weights on both sides):
- UNet (SD 2.1 layout): plain forward vs a forward that also returns the cross-attention maps of the
  capture resolution (the third level, 16×16 at 512 px).
- MM-DiT (SD3-medium layout): plain vs maps of every joint block vs TACA (γ active for every sample).
- ctcal_jax: one `jax.jit` per variant (`capture=None` / `AttnCapture(...)` / `taca=TACA(...)`), fused
  attention (`jax.nn.dot_product_attention`; maps rebuilt from its log-sum-exp).
- PyTorch: diffusers with its default SDPA processors for the plain forward; for maps / TACA the
  attention layers concerned get a processor that forms the softmax explicitly, as Attend-and-Excite,
  the official TACA code and gsn-factory do (only the captured layers, PyTorch's best case).
Overhead = median(variant) / median(plain) − 1, jit warm-up excluded, variants timed round-robin.

Output: a table of overheads (the headline) and `--json` with `capture_overhead` (ours, the larger of
the two models), `taca_overhead` (ours, MM-DiT), `device`, and per-model entries with both sides'
median times. The script measures; it does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# PyTorch shares the GPU with JAX here: JAX must not grab 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    SD3_MEDIUM, SD21_UNET, UNetMapsProcessor, captured_unet_layers, describe_device, jax_params, time_round_robin,
    to_torch_device, torch_device, torch_sync,
)
from ctcal_jax.attention import TACA, AttnCapture  # noqa: E402
from tests.tiny import JointProbsProcessor  # noqa: E402  (the explicit-softmax SD3 reference)

# ---------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for a laptop CPU in a few minutes, large enough that attention is a real share
    # of the forward (the same text/image token ratio as SD3 at 512 px, SD 2.1's UNet layout).
    "cpu-small": dict(
        dtype="float32", batch=2, runs=11,
        unet=dict(config=dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(64, 128, 256, 256), attention_head_dim=(2, 4, 8, 8), cross_attention_dim=256,
            down_block_types=SD21_UNET["down_block_types"], up_block_types=SD21_UNET["up_block_types"],
            use_linear_projection=True,
        ), latent=32, text_len=77, resolution=8),
        mmdit=dict(config=dict(
            sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
            pooled_projection_dim=128, out_channels=16, pos_embed_max_size=32,
        ), latent=32, text_len=77),
    ),
    "sd21-512": dict(
        dtype="bfloat16", batch=2, runs=20,
        unet=dict(config=SD21_UNET, latent=64, text_len=77, resolution=16),
        mmdit=dict(config=SD3_MEDIUM, latent=64, text_len=333),
    ),
    "sd3m-1024": dict(
        dtype="bfloat16", batch=2, runs=20,
        unet=dict(config=SD21_UNET, latent=64, text_len=77, resolution=16),
        mmdit=dict(config=SD3_MEDIUM, latent=128, text_len=333),
    ),
}
TACA_ON = TACA(gamma=1.2, t_threshold=970.0)
T_ACTIVE = 980.0  # every sample at or above the threshold: TACA's γ is in effect


# ---------------------------------------------------------------------------------------- PyTorch side


class _Switch:
    """Installed once; calls the processor of the current `mode` (so timing never re-installs)."""

    def __init__(self, mode: dict, procs: dict):
        self.mode, self.procs = mode, procs

    def __call__(self, *args, **kwargs):
        return self.procs[self.mode["name"]](*args, **kwargs)


def _torch_runner(model, procs_by_mode: dict[str, dict], call: Callable[[], Any], store: list):
    """Install `_Switch`es for the layers whose processor differs between modes; return
    `mode -> fn` running `call()` in that mode (maps averaged as ours are) and synchronising."""
    import torch

    mode = {"name": "plain"}
    names = procs_by_mode["plain"]
    model.set_attn_processor({n: _Switch(mode, {m: p[n] for m, p in procs_by_mode.items()}) for n in names})

    def make(name):
        def fn():
            mode["name"] = name
            store.clear()
            with torch.inference_mode():
                out = call()
                if store:
                    torch.stack(store).mean(0)
            torch_sync()
            return out
        return fn

    return {m: make(m) for m in procs_by_mode}


def _overheads(medians: dict[str, float]) -> dict[str, float]:
    return {f"{k}_overhead": medians[k] / medians["plain"] - 1.0 for k in medians if k != "plain"}


def _entry(medians: dict[str, float]) -> dict[str, Any]:
    return {"median_s": medians, **_overheads(medians)}


# ------------------------------------------------------------------------------------------------ UNet


def _both_sides(torch_cls, spec: dict, family: str, dtype_name: str, implementation: str):
    """The PyTorch model with seeded random weights (on its device, in `dtype_name`) and our Flax
    module + params converted from the same weights: `(ref, module, params)`."""
    import torch

    torch.manual_seed(0)
    ref = torch_cls(**spec["config"]).eval()
    module, params = jax_params(ref, family, jnp.dtype(dtype_name))
    return to_torch_device(ref, getattr(torch, dtype_name)), module.clone(implementation=implementation), params


def bench_unet(spec: dict, batch: int, dtype_name: str, runs: int, implementation: str) -> dict[str, Any]:
    import torch
    from diffusers import UNet2DConditionModel

    ref, module, params = _both_sides(UNet2DConditionModel, spec, "unet", dtype_name, implementation)
    dtype, tdtype = jnp.dtype(dtype_name), getattr(torch, dtype_name)

    rng = np.random.default_rng(0)
    lat, ctx_dim = spec["latent"], spec["config"]["cross_attention_dim"]
    x = rng.standard_normal((batch, lat, lat, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, spec["text_len"], ctx_dim)).astype(np.float32)
    t = np.full((batch,), T_ACTIVE, np.float32)

    # ctcal_jax
    xj, ctxj, tj = jnp.asarray(x, dtype), jnp.asarray(ctx, dtype), jnp.asarray(t)
    plain = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
    capture = jax.jit(lambda p, *a: module.apply({"params": p}, *a, capture=AttnCapture((spec["resolution"],))))
    jax_times = time_round_robin({
        "plain": lambda: jax.block_until_ready(plain(params, xj, tj, ctxj)),
        "capture": lambda: jax.block_until_ready(capture(params, xj, tj, ctxj)),
    }, runs)

    # PyTorch: SDPA everywhere vs explicit softmax on the captured cross-attention layers.
    dev = torch_device()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dev, tdtype)
    ctxt, tt = torch.from_numpy(ctx).to(dev, tdtype), torch.from_numpy(t).to(dev)
    default = dict(ref.attn_processors)
    captured = captured_unet_layers(default, spec["config"], lat, spec["resolution"])
    store: list = []
    explicit = {n: (UNetMapsProcessor(store) if n in captured else p) for n, p in default.items()}

    fns = _torch_runner(ref, {"plain": default, "capture": explicit}, lambda: ref(xt, tt, ctxt).sample, store)
    torch_times = time_round_robin(fns, runs)
    return {"config": spec, "captured_torch_layers": len(captured),
            "jax": _entry(jax_times), "torch": _entry(torch_times)}


# ---------------------------------------------------------------------------------------------- MM-DiT


def bench_mmdit(spec: dict, batch: int, dtype_name: str, runs: int, implementation: str) -> dict[str, Any]:
    import torch
    from diffusers import SD3Transformer2DModel

    ref, module, params = _both_sides(SD3Transformer2DModel, spec, "mmdit", dtype_name, implementation)
    dtype, tdtype = jnp.dtype(dtype_name), getattr(torch, dtype_name)

    cfg = spec["config"]
    rng = np.random.default_rng(0)
    lat = spec["latent"]
    x = rng.standard_normal((batch, lat, lat, cfg["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((batch, spec["text_len"], cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, cfg["pooled_projection_dim"])).astype(np.float32)
    t = np.full((batch,), T_ACTIVE, np.float32)

    args = (jnp.asarray(x, dtype), jnp.asarray(t), jnp.asarray(ctx, dtype), jnp.asarray(pooled, dtype))
    plain = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
    capture = jax.jit(lambda p, *a: module.apply({"params": p}, *a, capture=AttnCapture()))
    taca = jax.jit(lambda p, *a: module.apply({"params": p}, *a, taca=TACA_ON))
    jax_times = time_round_robin({
        "plain": lambda: jax.block_until_ready(plain(params, *args)),
        "capture": lambda: jax.block_until_ready(capture(params, *args)),
        "taca": lambda: jax.block_until_ready(taca(params, *args)),
    }, runs)

    dev = torch_device()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dev, tdtype)
    ctxt, pt = torch.from_numpy(ctx).to(dev, tdtype), torch.from_numpy(pooled).to(dev, tdtype)
    tt = torch.from_numpy(t).to(dev)
    default = dict(ref.attn_processors)
    store: list = []

    def joint(proc):
        return {n: (proc if ".attn." in n else p) for n, p in default.items()}

    fns = _torch_runner(ref, {
        "plain": default,
        "capture": joint(JointProbsProcessor(store=store)),
        "taca": joint(JointProbsProcessor(gamma=TACA_ON.gamma)),
    }, lambda: ref(xt, ctxt, pt, tt).sample, store)
    torch_times = time_round_robin(fns, runs)
    return {"config": spec, "jax": _entry(jax_times), "torch": _entry(torch_times)}


# ------------------------------------------------------------------------------------------------ main


def _row(model: str, side: str, e: dict[str, Any]) -> str:
    cap = f"{100 * e['capture_overhead']:+7.1f}%"
    taca = f"{100 * e['taca_overhead']:+7.1f}%" if "taca_overhead" in e else "      –"
    return f"{model:7s} {side:22s} {cap:>9s} {taca:>9s} {1000 * e['median_s']['plain']:11.1f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--runs", type=int, help="timed runs per variant (median reported)")
    parser.add_argument("--only", choices=("unet", "mmdit"), help="one model only")
    parser.add_argument("--implementation", choices=("fused", "explicit", "auto"), default="fused",
                        help="ctcal_jax attention path (default: the fused kernel path whose overhead is the "
                             "question; 'auto' is what models use: explicit on CPU, fused elsewhere)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    runs = args.runs or preset["runs"]

    results: dict[str, Any] = {"preset": args.preset, "device": describe_device(),
                               "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                               "dtype": preset["dtype"], "batch": preset["batch"], "runs": runs,
                               "implementation": args.implementation, "models": {}}
    if args.only in (None, "unet"):
        results["models"]["unet"] = bench_unet(preset["unet"], preset["batch"], preset["dtype"], runs, args.implementation)
    if args.only in (None, "mmdit"):
        results["models"]["mmdit"] = bench_mmdit(preset["mmdit"], preset["batch"], preset["dtype"], runs, args.implementation)
    models = results["models"]
    results["capture_overhead"] = max(m["jax"]["capture_overhead"] for m in models.values())
    if "mmdit" in models:
        results["taca_overhead"] = models["mmdit"]["jax"]["taca_overhead"]

    print(f"\nAttention overhead, preset {args.preset} ({preset['dtype']}, batch {preset['batch']}, "
          f"median of {runs})  —  {results['device']['jax']} / torch {results['device']['torch']}")
    print(f"{'model':7s} {'implementation':22s} {'+capture':>9s} {'+TACA':>9s} {'plain (ms)':>11s}")
    for name, m in models.items():
        print(_row(name, f"ctcal_jax ({args.implementation})", m["jax"]))
        print(_row(name, "PyTorch explicit", m["torch"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
