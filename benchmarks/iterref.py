"""Seconds per IterRef refinement (SPEC §6: 50 Adam updates of the latent at one sampling step):
ctcal_jax's jitted `iterref.refine` vs the same work in PyTorch the way gsn-factory does it, one run.

    python benchmarks/iterref.py --preset cpu-small --json out/iterref.json
    python benchmarks/iterref.py --preset sd14-512  --json out/iterref.json   # GPU host
    python benchmarks/iterref.py --preset sd21-512  --json out/iterref.json   # GPU host
    python benchmarks/iterref.py --preset sd14-512 --dry-run                  # any host

One refinement, identical on both sides (the same random UNet weights, latent, timestep t = 821,
text embeddings and subjects):
- a conditional-only UNet forward (SD 1.x layout) at t with the head- and layer-mean cross-attention
  maps of the 16×16 `attn2` layers;
- the loss (L_CN + L_IoU) / 2 (SPEC §6) of the processed subject maps (SPEC §2): softmax(100 · A) over
  the prompt's real tokens, sub-token mean, Gaussian smoothing k = 3, σ = 0.5 (reflect padding);
- its gradient w.r.t. the latent and an Adam update (ε = 1e-3, lr `LR`: not the paper's, which is not
  public; the time does not depend on it); `iters` (50) times.
The subjects: a 7-token prompt (EOT at position 8, then padding) with two subjects, one a single token,
one split into two sub-tokens; the text embeddings are a seeded random `[B, 77, D]` tensor (the text
encoder runs once per image, outside the refinement).

ctcal_jax: `jax.jit` of `iterref.refine` (a `fori_loop` of `jax.grad` through the UNet applied with
`AttnCapture(resolutions=(16,))`, `optax.adam`); attention "auto" (explicit on CPU, fused with maps
rebuilt from the log-sum-exp on GPU). XLA drops the part of the forward the loss does not read (the
UNet after its last captured layer).
PyTorch (gsn-factory, which builds on Attend-and-Excite): diffusers `UNet2DConditionModel` whose every
attention layer has an A&E-style processor forming softmax(QKᵀ/√d) explicitly
(`common.UNetMapsProcessor`), the 16×16 cross-attention layers storing their head-mean maps with
their autograd graph; the loss in torch (batched over subjects, no Python loop); `loss.backward()` to
the latent (weights frozen); `torch.optim.Adam(eps=1e-3)`. Also timed: the same with SDPA in every
layer but the captured ones (PyTorch's best case, as `ctcal_step.py` runs it).
CPU presets run fp32; GPU presets bf16 weights and compute (the latent and Adam in fp32 on both sides).

Before timing, both sides compute the loss and its gradient on the same latent: the loss must agree
(asserted: relative difference ≤ 1e-4 in fp32, 2e-2 in bf16, so the timings compare equal work);
the gradient's and, after the timed runs, the refined latents' differences are printed.
Timing: JAX's first call (tracing + compilation + one refinement) apart; then the variants take turns
(`common.time_round_robin_all`), median of `runs`. Speed-up = PyTorch time / JAX time.

`--dry-run` builds the preset without weights: the PyTorch UNet on the meta device and the JAX
refinement traced with abstract params (`jax.eval_shape`): what a CPU can check of the GPU presets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # benchmarks/ctcal_torch.py imports tests/tiny.py
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see ctcal_step.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    SD21_UNET, UNetMapsProcessor, abstract_model, captured_unet_layers, count_params, jax_params, run_record,
    time_round_robin_all, to_torch_device, torch_device, torch_model, torch_sync, write_json,
)
from benchmarks.ctcal_torch import gaussian_kernel_2d, smooth, take_maps  # noqa: E402
from conversion import tiny  # noqa: E402
from ctcal_jax import iterref, nouns  # noqa: E402
from ctcal_jax.attention import AttnCapture  # noqa: E402

# ---------------------------------------------------------------------------------------------- presets

T_STEP = 821.0  # SD 1.4, DDPM 50 steps: step index 8 (SPEC §6)
LR, EPS = 0.01, 1e-3
SUBJECTS = [[2], [5, 6]]  # token positions of the two subjects (the second: two sub-tokens)
REAL_TOKENS = range(1, 8)  # positions 1..7: the prompt's tokens (SOT 0, EOT 8, padding after)
TEXT_LEN = 77
# SD 1.4's UNet (`CompVis/stable-diffusion-v1-4/unet/config.json`): SD 2.1's blocks, 8 heads, 768-wide
# text, no linear projections.
SD14_UNET = {**SD21_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "use_linear_projection": False}

PRESETS: dict[str, dict[str, Any]] = {
    # SD 1.x's layout at 1/5 width, 32×32 latents: the 16×16 maps are the second level's (2 down + 3 up
    # `attn2` layers, as SD 1.4's at 512 px). A minute or two on 2 cores.
    "cpu-small": dict(
        dtype="float32", batch=1, runs=3, iters=50, latent=32, resolution=16,
        unet=dict(_class_name="UNet2DConditionModel", sample_size=32, in_channels=4, out_channels=4,
                  layers_per_block=2, block_out_channels=[64, 128, 256, 256], attention_head_dim=8,
                  cross_attention_dim=256, down_block_types=list(SD14_UNET["down_block_types"]),
                  up_block_types=list(SD14_UNET["up_block_types"])),
    ),
    # The built-in tiny UNet (`conversion.tiny`), 2 iterations: the smoke test's preset.
    "cpu-tiny": dict(dtype="float32", batch=1, runs=1, iters=2, latent=32, resolution=16, unet=tiny.UNET),
    # SD 1.4's UNet at 512 px (64×64 latents), bf16: the setting of SPEC §6.
    "sd14-512": dict(dtype="bfloat16", batch=1, runs=10, iters=50, latent=64, resolution=16,
                     unet={"_class_name": "UNet2DConditionModel", **SD14_UNET}),
    # SD 2.1-base's UNet at 512 px, bf16.
    "sd21-512": dict(dtype="bfloat16", batch=1, runs=10, iters=50, latent=64, resolution=16,
                     unet={"_class_name": "UNet2DConditionModel", **SD21_UNET}),
}
LOSS_TOL = {"float32": 1e-4, "bfloat16": 2e-2}

# ------------------------------------------------------------------------------------------- the inputs


def inputs(preset: dict[str, Any]) -> dict[str, np.ndarray]:
    """The latent `[B, h, w, 4]`, text embeddings `[B, 77, D]`, subject weights `[B, G, 77]` and real-token
    mask `[B, 77]` (float32 / bool numpy)."""
    b, lat = preset["batch"], preset["latent"]
    rng = np.random.default_rng(0)
    mask = np.zeros(TEXT_LEN, bool)
    mask[list(REAL_TOKENS)] = True
    return {
        "z": rng.standard_normal((b, lat, lat, 4)).astype(np.float32),
        "context": rng.standard_normal((b, TEXT_LEN, preset["unet"]["cross_attention_dim"])).astype(np.float32),
        "weights": np.stack([nouns.group_weights(SUBJECTS, len(SUBJECTS), TEXT_LEN)] * b),
        "mask": np.stack([mask] * b),
    }


# --------------------------------------------------------------------------------------- ctcal_jax side


def jax_side(module: Any, preset: dict[str, Any]) -> SimpleNamespace:
    """Jitted `refine(params, z, context, weights, mask) -> z` and `loss_and_grad(...) -> (loss, dz)`."""
    capture = AttnCapture(resolutions=(preset["resolution"],))

    def denoise_fn(params, context):
        def denoise(z, t):
            tb = jnp.full((z.shape[0],), t, jnp.float32)
            return module.apply({"params": params}, z, tb, context, capture=capture)
        return denoise

    def refine(params, z, context, weights, mask):
        return iterref.refine(denoise_fn(params, context), z, T_STEP, weights, n_iters=preset["iters"], lr=LR,
                              eps=EPS, token_mask=mask)

    def loss(z, params, context, weights, mask):
        attn = denoise_fn(params, context)(z, T_STEP)[1]["attn"]
        return iterref.batch_loss(attn, weights, mask)

    grad = jax.jit(jax.value_and_grad(loss))
    return SimpleNamespace(refine=jax.jit(refine),
                           loss_and_grad=lambda params, z, *rest: grad(z, params, *rest))


# ---------------------------------------------------------------------------------------- PyTorch side


def torch_batch_loss(attn: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """`iterref.batch_loss` ("cn+iou") in torch: raw maps `[B, H, W, T]` fp32, weights `[B, G, T]`,
    mask `[B, T]` bool -> scalar (sum over the batch)."""
    m = mask[:, None, None, :]
    probs = torch.softmax((100.0 * attn).masked_fill(~m, float("-inf")), -1).masked_fill(~m, 0.0)
    maps = smooth(torch.einsum("bhwt,bgt->bghw", probs, weights), kernel)  # [B, G, H, W]
    valid = weights.sum(-1) > 0  # [B, G]
    zero = torch.zeros((), device=maps.device)
    cn = torch.where(valid, F.relu(1.0 - maps.amax((2, 3))), zero).amax(-1)
    inter = torch.minimum(maps[:, :, None], maps[:, None]).sum((3, 4))  # [B, G, G]
    total = maps.sum((2, 3))
    union = total[:, :, None] + total[:, None]
    g = maps.shape[1]
    pairs = torch.triu(torch.ones(g, g, dtype=torch.bool, device=maps.device), 1) & valid[:, :, None] & valid[:, None]
    ok = pairs & (union > 0)
    ratio = torch.where(ok, inter / torch.where(ok, union, torch.ones_like(union)), zero)
    n = pairs.sum((1, 2))
    iou = torch.where(n > 0, ratio.sum((1, 2)) / n.clamp_min(1), zero)
    return (0.5 * (cn + iou)).sum()


def torch_side(unet, preset: dict[str, Any], data: dict[str, np.ndarray]) -> SimpleNamespace:
    """The PyTorch refinement (module docstring): `refine(mode) -> z` for mode "explicit" (A&E
    processors in every layer) or "sdpa" (in the captured layers only), and `loss_and_grad()`."""
    dev, r = torch_device(), preset["resolution"]
    unet.requires_grad_(False)
    default = dict(unet.attn_processors)
    captured = captured_unet_layers(default, preset["unet"], preset["latent"], r)
    store: list[torch.Tensor] = []
    processors = {
        "explicit": {n: UNetMapsProcessor(store if n in captured else None) for n in default},
        "sdpa": {n: (UNetMapsProcessor(store) if n in captured else p) for n, p in default.items()},
    }
    t = {k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy() if k == "z" else v).to(dev) for k, v in data.items()}
    dtype = unet.dtype
    context, timestep = t["context"].to(dtype), torch.full((preset["batch"],), T_STEP, device=dev)
    kernel = gaussian_kernel_2d(3, 0.5).to(dev)

    def loss(z: torch.Tensor) -> torch.Tensor:
        store.clear()
        unet(z.to(dtype), timestep, context)
        return torch_batch_loss(take_maps(store, r), t["weights"], t["mask"], kernel)

    def refine(mode: str) -> torch.Tensor:
        unet.set_attn_processor(dict(processors[mode]))  # diffusers pops from the dict
        z = t["z"].clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=LR, eps=EPS)
        for _ in range(preset["iters"]):
            opt.zero_grad(set_to_none=True)
            loss(z).backward()
            opt.step()
        torch_sync()
        return z.detach()

    def loss_and_grad() -> tuple[float, np.ndarray]:
        unet.set_attn_processor(dict(processors["explicit"]))
        z = t["z"].clone().requires_grad_(True)
        value = loss(z)
        value.backward()
        return float(value.detach()), z.grad.permute(0, 2, 3, 1).float().cpu().numpy()

    return SimpleNamespace(refine=refine, loss_and_grad=loss_and_grad, captured=captured)


# ------------------------------------------------------------------------------------------------ running


def rel(ours: Any, theirs: Any) -> float:
    """Max-abs difference over max-abs reference (SPEC §1)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def run(preset: dict[str, Any], runs: int, warmup: int) -> dict[str, Any]:
    dtype = preset["dtype"]
    unet = torch_model(preset["unet"], seed=0)
    module, params = jax_params(unet, "unet", jnp.dtype(dtype))
    data = inputs(preset)
    ours = jax_side(module, preset)
    theirs = torch_side(to_torch_device(unet, getattr(torch, dtype)).train(False), preset, data)
    args = [jnp.asarray(data[k]) for k in ("z", "context", "weights", "mask")]
    args[1] = args[1].astype(dtype)

    # The same work: loss and gradient on the same latent, before anything is timed.
    jax_loss, jax_grad = jax.device_get(ours.loss_and_grad(params, *args))
    torch_loss, torch_grad = theirs.loss_and_grad()
    loss_diff = abs(float(jax_loss) - torch_loss) / max(abs(torch_loss), 1e-30)
    check = {"loss_jax": float(jax_loss), "loss_torch": torch_loss, "loss_rel_diff": loss_diff,
             "grad_rel_diff": rel(jax_grad, torch_grad)}
    print(f"check: loss ctcal_jax {float(jax_loss):.6f}, PyTorch {torch_loss:.6f}, rel. diff {loss_diff:.2e}; "
          f"gradient w.r.t. the latent: max-abs rel. diff {check['grad_rel_diff']:.2e}", flush=True)
    if not loss_diff <= LOSS_TOL[dtype]:
        raise AssertionError(f"the two sides' IterRef losses differ by {loss_diff:.2e} (> {LOSS_TOL[dtype]:.0e}): "
                             "the benchmark would not compare equal work")

    start = time.perf_counter()
    z_jax = jax.block_until_ready(ours.refine(params, *args))
    first = time.perf_counter() - start
    fns = {"jax": lambda: jax.block_until_ready(ours.refine(params, *args)),
           "torch": lambda: theirs.refine("explicit"),
           "torch_sdpa": lambda: theirs.refine("sdpa"),
           "jax_one_grad": lambda: jax.block_until_ready(ours.loss_and_grad(params, *args))}
    times = time_round_robin_all(fns, runs, warmup)
    z_torch = theirs.refine("explicit").permute(0, 2, 3, 1).float().cpu().numpy()
    check["refined_latent_rel_diff"] = rel(z_jax, z_torch)
    check["latent_change_rel"] = rel(z_jax, data["z"]) if preset["iters"] else 0.0
    med = {k: statistics.median(v) for k, v in times.items()}
    b = preset["batch"]
    return {
        "jax_s_per_refinement": med["jax"], "torch_s_per_refinement": med["torch"],
        "torch_sdpa_s_per_refinement": med["torch_sdpa"],
        "jax_s_per_image": med["jax"] / b, "torch_s_per_image": med["torch"] / b,
        "speedup": med["torch"] / med["jax"], "speedup_vs_torch_sdpa": med["torch_sdpa"] / med["jax"],
        "jax_one_loss_and_grad_s": med["jax_one_grad"], "jax_first_call_s": first,
        "times_s": times, "check": check, "captured_torch_layers": theirs.captured,
    }


def dry_run(preset: dict[str, Any]) -> dict[str, Any]:
    """The preset without weights: PyTorch on the meta device, the JAX refinement traced (abstract)."""
    torch_count = count_params(dict(torch_model(preset["unet"], meta=True).named_parameters()))
    module, params = abstract_model(preset["unet"], jnp.dtype(preset["dtype"]))
    data = inputs(preset)
    args = [jax.ShapeDtypeStruct(data[k].shape, preset["dtype"] if k == "context" else data[k].dtype)
            for k in ("z", "context", "weights", "mask")]
    start = time.perf_counter()
    out = jax.eval_shape(jax_side(module, preset).refine, params, *args)
    return {"torch_params": torch_count, "jax_params": count_params(params), "trace_s": time.perf_counter() - start,
            "output": f"{out.dtype}{list(out.shape)}", "params_match": torch_count == count_params(params)}


# ------------------------------------------------------------------------------------------------ report


def describe(preset: dict[str, Any]) -> str:
    return (f"{preset['dtype']}, batch {preset['batch']}, UNet {preset['latent']}×{preset['latent']} latents, "
            f"{preset['resolution']}×{preset['resolution']} maps, {preset['iters']} Adam iterations, t = {T_STEP:g}")


def print_report(r: dict[str, Any]) -> None:
    n = max(r["iters"], 1)
    print(f"\nIterRef, preset {r['preset']} ({r['setting']}, median of {r['runs']})  —  "
          f"{r['device']['jax']} / torch {r['device']['torch']}")
    print(f"{'implementation':58s} {'s / refinement':>14s} {'ms / iter':>10s} {'vs PyTorch':>11s}")
    rows = (("jax", "ctcal_jax iterref.refine (jit)"),
            ("torch", "PyTorch, explicit softmax in every layer (gsn-factory)"),
            ("torch_sdpa", "PyTorch, explicit softmax in captured layers, SDPA else"))
    for side, name in rows:
        s = r[f"{side}_s_per_refinement"]
        print(f"{name:58s} {s:14.3f} {1000 * s / n:10.1f} {r['torch_s_per_refinement'] / s:10.2f}×")
    print(f"ctcal_jax one loss + gradient (jit), for reference: {1000 * r['jax_one_loss_and_grad_s']:.1f} ms")
    print(f"JAX first call (trace + compile + one refinement) {r['jax_first_call_s']:.1f} s, not in the times above")
    c = r["check"]
    print(f"Same latent and weights: loss {c['loss_jax']:.6f} / {c['loss_torch']:.6f} (rel. diff "
          f"{c['loss_rel_diff']:.2e}), gradient rel. diff {c['grad_rel_diff']:.2e}; refined latents after "
          f"{r['iters']} iterations rel. diff {c['refined_latent_rel_diff']:.2e} (they moved "
          f"{c['latent_change_rel']:.2e} from the start)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--runs", type=int, help="timed refinements per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed refinements per variant after JAX's first call")
    parser.add_argument("--iters", type=int, help="Adam iterations per refinement (default: the preset's, 50)")
    parser.add_argument("--batch", type=int, help="latents refined together (default: the preset's)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the preset without weights (PyTorch on the meta device, ctcal_jax traced with "
                             "abstract params): a CPU check of the GPU presets; nothing is timed")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    preset["iters"] = preset["iters"] if args.iters is None else args.iters
    preset["batch"] = args.batch or preset["batch"]
    runs = args.runs or preset["runs"]
    results: dict[str, Any] = {"preset": args.preset, "setting": describe(preset), "dtype": preset["dtype"],
                               "batch": preset["batch"], "iters": preset["iters"], "lr": LR, "eps": EPS,
                               "timestep": T_STEP, "subjects": SUBJECTS, "config": preset["unet"]}
    if args.dry_run:
        results.update(dry_run(preset))
        print(f"Dry run, preset {args.preset} ({results['setting']}): UNet parameters PyTorch (meta) "
              f"{results['torch_params'] / 1e6:.2f} M, ctcal_jax (abstract) {results['jax_params'] / 1e6:.2f} M "
              f"(match: {results['params_match']}); refine traced in {results['trace_s']:.1f} s -> {results['output']}")
        return write_json(args.json, results)
    results.update({**run_record(runs), **run(preset, runs, args.warmup)})
    print_report(results)
    return write_json(args.json, results)


if __name__ == "__main__":
    main()
