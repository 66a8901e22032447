"""Seconds per image of text-to-image sampling: ctcal_jax's `sampling.generate` vs diffusers'
pipeline, the same weights, scheduler, steps, guidance and initial latents, in one run.

    python benchmarks/sampling.py --preset cpu-small     --json out/sampling.json
    python benchmarks/sampling.py --preset cpu-small-sd3 --json out/sampling.json
    python benchmarks/sampling.py --preset sd21-512      --json out/sampling.json   # GPU host
    python benchmarks/sampling.py --preset sd3m-1024     --json out/sampling.json   # GPU host
    python benchmarks/sampling.py --preset sd3m-1024 --dry-run                      # any host

What runs:
- One diffusers pipeline folder with random weights (`common.unit_scale_init`), written with
  `save_pretrained` (safetensors, in the preset's dtype) into a temporary folder: the denoiser, the
  CLIP text encoder(s) with the real CLIP tokenizer, the VAE and the scheduler config. SD3 pipelines
  are saved without T5 (`text_encoder_3=None`): both sides then use a zero T5 stream, as diffusers
  does for such a folder (a T5-XXL forward is once per image, against 2 × steps MM-DiT forwards).
- PyTorch: `StableDiffusionPipeline` / `StableDiffusion3Pipeline` holding those models (diffusers'
  default attention processors, SDPA), `output_type="np"` (or `"latent"` with `--no-decode`),
  `torch.inference_mode`. ctcal_jax: `sampling.load_pipeline(folder)` and `sampling.generate`: prompt
  encoding, the CFG loop (one `lax.scan`) and VAE decoding in one jitted program.
- Both: the same prompts (batch `batch`, the empty negative prompt), scheduler (`DDIMScheduler` /
  "ddim", `FlowMatchEulerDiscreteScheduler` / "flow_euler", settings from the folder), steps, CFG
  scale and initial latents (one seeded Gaussian array). VAE decoding is included on both sides
  unless `--no-decode` (then both stop at the final latents); the table says which.
- CPU presets: fp32 on both sides. GPU presets: bf16 weights and compute on both sides; the
  full-size configs are `conversion.known`'s (SD 2.1-base's UNet and OpenCLIP-H; SD3-medium's MM-DiT,
  CLIP-L, CLIP-G) and the SD VAEs' (`SD_VAE`, `SD3_VAE` below). PyTorch runs on CUDA when available.

Timing: JAX's first call (tracing + compilation + one run) is reported apart; then the two sides
take turns (`common.time_round_robin_all`; `warmup` untimed calls each), `block_until_ready` /
`cuda.synchronize`, median of `runs`, divided by the batch: seconds per image. Speed-up = PyTorch
time / JAX time. Host work of a call (tokenization, the sampler's plan) is timed on both sides.
The first outputs of both sides are compared (max |Δ| of the images in [0, 1], or max-abs-relative
of the latents): printed, not asserted.

`--dry-run` builds the preset's configs without weights: the PyTorch models and pipeline on the meta
device (parameter counts) and the JAX pipeline with abstract params, traced through `generate` with
`jax.eval_shape` (output shapes): what a CPU can check of the GPU presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# PyTorch shares the GPU with JAX here: JAX must not grab 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Sleeping OpenMP waiters keep PyTorch's CPU times stable on a shared machine (see ctcal_step.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    abstract_model, class_name, count_params, run_record, time_round_robin_all, torch_device, torch_model,
    torch_sync, write_json,
)
from conversion import known, tiny  # noqa: E402
from ctcal_jax import sampling, text  # noqa: E402
from ctcal_jax.builder import Pipeline  # noqa: E402
from ctcal_jax.tokenizers import clip_tokenizer  # noqa: E402

# ---------------------------------------------------------------------------------------------- presets


def vae(channels: list[int], latent_channels: int, scaling: float, shift: float | None, layers: int = 2,
        groups: int = 32) -> dict[str, Any]:
    """An SD-style `AutoencoderKL` config (8× down-sampling); `shift` set: SD3's (no quant convs)."""
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": channels, "layers_per_block": layers, "latent_channels": latent_channels,
            "norm_num_groups": groups, "scaling_factor": scaling, "shift_factor": shift,
            "use_quant_conv": shift is None, "use_post_quant_conv": shift is None}


# The VAEs of SD 1.x/2.x and SD3 (`vae/config.json` of the hub pipelines).
SD_VAE = vae([128, 256, 512, 512], 4, 0.18215, None)
SD3_VAE = vae([128, 256, 512, 512], 16, 1.5305, 0.0609)
SD21 = known.PIPELINES["stabilityai/stable-diffusion-2-1-base"]
SD3M = known.PIPELINES["stabilityai/stable-diffusion-3-medium-diffusers"]


def clip(hidden: int, layers: int, projection: int | None = None, act: str = "gelu") -> dict[str, Any]:
    """A small CLIP text model config; with `projection`, `CLIPTextModelWithProjection` (SD3)."""
    return {"architectures": ["CLIPTextModel" if projection is None else "CLIPTextModelWithProjection"],
            "vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": projection or hidden}


PROMPTS = ["a red cube on top of a blue sphere", "a cat and a dog under an umbrella",
           "an orange kite above a lighthouse", "two bowls of lemons on a wooden table"]

PRESETS: dict[str, dict[str, Any]] = {
    # SD 2.1's UNet layout at 1/5 width (attention on the 32×32, 16×16 and 8×8 levels, as SD 2.1's at
    # 512 px is on 64/32/16), 32×32 latents (256 px), a 4-layer CLIP, a thin VAE: the UNet is ~90 % of
    # the work. A minute or two on 2 cores.
    "cpu-small": dict(
        family="sd2", dtype="float32", batch=1, runs=5, steps=20, guidance=7.5, size=256,
        components=dict(
            unet=dict(_class_name="UNet2DConditionModel", sample_size=32, in_channels=4, out_channels=4,
                      layers_per_block=2, block_out_channels=[64, 128, 256, 256], attention_head_dim=[2, 4, 8, 8],
                      cross_attention_dim=256, down_block_types=list(SD21["unet"]["down_block_types"]),
                      up_block_types=list(SD21["unet"]["up_block_types"]), use_linear_projection=True),
            text_encoder=clip(256, 4),
            vae=vae([32, 32, 64, 64], 4, 0.18215, None, layers=1, groups=16)),
        scheduler_config={**SD21["scheduler"], "_class_name": "DDIMScheduler"},
    ),
    # SD3's layout at toy size (the MM-DiT of ctcal_step's cpu-small-sd3: 4 joint blocks, 4 heads × 32,
    # 32×32 latents = 256 image tokens), CLIP-L/G-like encoders, a thin 16-channel VAE.
    "cpu-small-sd3": dict(
        family="sd3", dtype="float32", batch=1, runs=5, steps=20, guidance=7.0, size=256,
        components=dict(
            transformer=dict(_class_name="SD3Transformer2DModel", sample_size=32, patch_size=2, in_channels=16,
                             out_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=4,
                             joint_attention_dim=256, caption_projection_dim=128, pooled_projection_dim=192,
                             pos_embed_max_size=32),
            text_encoder=clip(64, 2, projection=64, act="quick_gelu"),
            text_encoder_2=clip(128, 2, projection=128),
            vae=vae([32, 32, 64, 64], 16, 1.5305, 0.0609, layers=1, groups=16)),
        scheduler_config=SD3M["scheduler"],
    ),
    # The built-in tiny pipelines' models (`conversion.tiny`), 2 steps: the smoke test's preset.
    "cpu-tiny": dict(
        family="sd2", dtype="float32", batch=1, runs=1, steps=2, guidance=7.5, size=256,
        components={c: cfg for c, (cfg, _, _) in tiny.PIPELINES["tiny-sd2"]["components"].items()},
        scheduler_config=tiny.SD2_SCHEDULER,
    ),
    "cpu-tiny-sd3": dict(
        family="sd3", dtype="float32", batch=1, runs=1, steps=2, guidance=7.0, size=256,
        components={c: cfg for c, (cfg, _, _) in tiny.PIPELINES["tiny-sd3"]["components"].items()},
        scheduler_config=tiny.SD3_SCHEDULER,
    ),
    # SD 2.1-base (512 px: UNet, OpenCLIP-H), DDIM 50 steps, CFG 7.5, bf16.
    "sd21-512": dict(
        family="sd2", dtype="bfloat16", batch=1, runs=5, steps=50, guidance=7.5, size=512,
        components=dict(unet=SD21["unet"], text_encoder=SD21["text_encoder"], vae=SD_VAE),
        scheduler_config={**SD21["scheduler"], "_class_name": "DDIMScheduler"},
    ),
    # SD3-medium at 1024 px (MM-DiT 2B, CLIP-L, CLIP-G; no T5), flow-matching Euler 28 steps, CFG 7.0, bf16.
    "sd3m-1024": dict(
        family="sd3", dtype="bfloat16", batch=1, runs=5, steps=28, guidance=7.0, size=1024,
        components=dict(transformer=SD3M["transformer"], text_encoder=SD3M["text_encoder"],
                        text_encoder_2=SD3M["text_encoder_2"], vae=SD3_VAE),
        scheduler_config=SD3M["scheduler"],
    ),
}
SCHEDULER_KIND = {"DDIMScheduler": "ddim", "FlowMatchEulerDiscreteScheduler": "flow_euler"}
# SD 2.x and SD3's CLIP-G tokenizers pad with "!", SD3's CLIP-L with the EOT token.
TOKENIZER_PAD = {"sd2": {"tokenizer": "!"}, "sd3": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}}

# ------------------------------------------------------------------------------------------- the models


def torch_pipeline(preset: dict[str, Any], meta: bool = False):
    """The diffusers pipeline of the preset's configs: random weights (`meta`: shapes only), the real
    CLIP tokenizer, the scheduler; fp32 on the CPU."""
    import diffusers

    models = {c: torch_model(cfg, seed=i, meta=meta) for i, (c, cfg) in enumerate(preset["components"].items())}
    tokenizers = {name: clip_tokenizer(pad_token=pad) for name, pad in TOKENIZER_PAD[preset["family"]].items()}
    cfg = preset["scheduler_config"]
    scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    if preset["family"] == "sd2":
        return diffusers.StableDiffusionPipeline(**models, **tokenizers, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    return diffusers.StableDiffusion3Pipeline(**models, **tokenizers, scheduler=scheduler, text_encoder_3=None,
                                              tokenizer_3=None)


def build(preset: dict[str, Any], folder: Path) -> tuple[Any, Pipeline]:
    """Both sides from one saved folder: `(diffusers pipeline on its device, ctcal_jax pipeline)`."""
    import torch

    tdtype = getattr(torch, preset["dtype"])
    ref = torch_pipeline(preset)
    if tdtype != torch.float32:
        ref = ref.to(dtype=tdtype)
    ref.save_pretrained(folder, safe_serialization=True)
    ref = ref.to(torch_device())
    ref.set_progress_bar_config(disable=True)
    return ref, sampling.load_pipeline(folder, dtype=jnp.dtype(preset["dtype"]), with_t5=False)


def abstract_pipeline(preset: dict[str, Any]) -> Pipeline:
    """The ctcal_jax pipeline of the preset's configs with `jax.ShapeDtypeStruct` params (no weights)."""
    dtype = jnp.dtype(preset["dtype"])
    modules, params = {}, {}
    for c, cfg in preset["components"].items():
        modules[c], params[c] = abstract_model(cfg, dtype)
    family = preset["family"]
    name = "unet" if family == "sd2" else "transformer"
    texts = {c: m for c, m in modules.items() if c.startswith("text_encoder")}
    tokenizers = {c.replace("tokenizer", "text_encoder"): clip_tokenizer(pad_token=pad)
                  for c, pad in TOKENIZER_PAD[family].items()}
    lengths = {c: 77 for c in texts} | ({"text_encoder_3": 256} if family == "sd3" else {})
    joint = preset["components"][name].get("joint_attention_dim") if family == "sd3" else None
    encoders = text.PromptEncoders("sd" if family == "sd2" else "sd3", tokenizers, texts, lengths, joint)
    return Pipeline(family, modules[name], encoders, params, preset["scheduler_config"], modules["vae"],
                    source=f"benchmark preset ({family})", latent_size=preset["components"][name]["sample_size"])


# ------------------------------------------------------------------------------------------------ running


def sampler_args(preset: dict[str, Any]) -> dict[str, Any]:
    return {"num_inference_steps": preset["steps"], "guidance_scale": preset["guidance"]}


def latent_shape(preset: dict[str, Any]) -> tuple[int, int, int, int]:
    """`[B, h, w, C]` of the preset's initial latents."""
    name = "unet" if preset["family"] == "sd2" else "transformer"
    side = preset["size"] // 8
    return preset["batch"], side, side, preset["components"][name]["in_channels"]


def make_runners(preset: dict[str, Any], ref: Any, pipe: Pipeline, decode: bool):
    """`(run_jax, run_torch)`: one whole sampling call each, finished; both return numpy `[B, H, W, 3]`
    images or `[B, h, w, C]` latents."""
    import torch

    prompts = (PROMPTS * preset["batch"])[:preset["batch"]]
    latents = np.random.default_rng(0).standard_normal(latent_shape(preset)).astype(np.float32)
    latents_t = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(torch_device(), ref.dtype)
    kind = SCHEDULER_KIND[preset["scheduler_config"]["_class_name"]]

    def run_jax() -> np.ndarray:
        out = sampling.generate(pipe, prompts, scheduler=kind, latents=latents, decode=decode, **sampler_args(preset))
        return np.asarray(jax.block_until_ready(out["images" if decode else "latents"]))

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            out = ref(prompt=prompts, latents=latents_t, output_type="np" if decode else "latent",
                      **sampler_args(preset)).images
            torch_sync()
        return out if decode else out.float().permute(0, 2, 3, 1).cpu().numpy()

    return run_jax, run_torch


def output_check(ours: np.ndarray, theirs: np.ndarray, decode: bool) -> dict[str, Any]:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    diff = float(np.abs(ours - theirs).max())
    if decode:
        return {"what": "images in [0, 1]", "max_abs_diff": diff, "shape": list(ours.shape)}
    return {"what": "final latents", "max_abs_rel_diff": diff / max(float(np.abs(theirs).max()), 1e-12),
            "shape": list(ours.shape)}


def breakdown(preset: dict[str, Any], ref: Any, pipe: Pipeline, runs: int) -> dict[str, dict[str, float]]:
    """Where a call's time goes: median seconds of one denoiser forward at the CFG batch (random
    text features of the pipeline's shapes) and of one VAE decode, per side (jit / inference_mode)."""
    import torch

    b, h, w, c = latent_shape(preset)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2 * b, h, w, c)).astype(np.float32)
    t = np.full((2 * b,), 500.0, np.float32)
    if preset["family"] == "sd2":
        extra = [rng.standard_normal((2 * b, 77, preset["components"]["unet"]["cross_attention_dim"]))]
    else:
        cfg = preset["components"]["transformer"]
        extra = [rng.standard_normal((2 * b, 77 + 256, cfg["joint_attention_dim"])),
                 rng.standard_normal((2 * b, cfg["pooled_projection_dim"]))]
    extra = [e.astype(np.float32) for e in extra]
    z = x[:b] / pipe.vae.scaling_factor
    name = pipe.denoiser_name
    dtype = jax.tree.leaves(pipe.params[name])[0].dtype
    denoise = jax.jit(lambda p, x, t, *e: pipe.denoiser.apply({"params": p}, x, t, *e)[0])
    decode = jax.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method="decode"))
    j = [jnp.asarray(a, dtype) for a in (x, *extra, z)]
    dev = torch_device()

    def tt(a, nchw=False):
        return torch.from_numpy(a.transpose(0, 3, 1, 2).copy() if nchw else a).to(dev, ref.dtype)

    ex, zt, tt_ = tt(x, True), tt(z, True), torch.from_numpy(t).to(dev)
    et = [tt(e) for e in extra]
    denoiser = getattr(ref, name)

    def torch_call(fn):
        def call():
            with torch.inference_mode():
                fn()
                torch_sync()
        return call

    fns = {
        "jax_denoiser": lambda: jax.block_until_ready(denoise(pipe.params[name], j[0], jnp.asarray(t), *j[1:-1])),
        "torch_denoiser": torch_call(lambda: denoiser(ex, tt_, *et) if name == "unet"
                                     else denoiser(ex, et[0], et[1], tt_)),
        "jax_vae_decode": lambda: jax.block_until_ready(decode(pipe.params["vae"], j[-1])),
        "torch_vae_decode": torch_call(lambda: ref.vae.decode(zt)),
    }
    med = {k: statistics.median(v) for k, v in time_round_robin_all(fns, runs).items()}
    return {side: {part: med[f"{side}_{part}"] for part in ("denoiser", "vae_decode")} for side in ("jax", "torch")}


def run(preset: dict[str, Any], runs: int, warmup: int, decode: bool, parts: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        ref, pipe = build(preset, Path(tmp) / "pipeline")
        run_jax, run_torch = make_runners(preset, ref, pipe, decode)
        start = time.perf_counter()
        ours = run_jax()
        first = time.perf_counter() - start
        check = output_check(ours, run_torch(), decode)
        times = time_round_robin_all({"jax": run_jax, "torch": run_torch}, runs, warmup)
        split = breakdown(preset, ref, pipe, max(runs, 3)) if parts else None
    med = {k: statistics.median(v) for k, v in times.items()}
    b = preset["batch"]
    return {
        "jax_s_per_image": med["jax"] / b, "torch_s_per_image": med["torch"] / b,
        "speedup": med["torch"] / med["jax"], "jax_first_call_s": first,
        "jax_images_per_s": b / med["jax"], "torch_images_per_s": b / med["torch"],
        "call_times_s": times, "output_check": check, "breakdown_s": split,
    }


def dry_run(preset: dict[str, Any], decode: bool) -> dict[str, Any]:
    """Configs and shapes of the preset without weights (module docstring)."""
    ref = torch_pipeline(preset, meta=True)
    torch_counts = {c: count_params(dict(getattr(ref, c).named_parameters())) for c in preset["components"]}
    pipe = abstract_pipeline(preset)
    jax_counts = {c: count_params(p) for c, p in pipe.params.items()}
    prompts = (PROMPTS * preset["batch"])[:preset["batch"]]
    latents = np.zeros(latent_shape(preset), np.float32)
    kind = SCHEDULER_KIND[preset["scheduler_config"]["_class_name"]]

    def sample(params):
        with jax.ensure_compile_time_eval():  # generate's host-side set-up stays concrete under the trace
            out = sampling.generate(dataclasses.replace(pipe, params=params), prompts, scheduler=kind, latents=latents,
                                    decode=decode, **sampler_args(preset))
        return {k: out[k] for k in ("latents", "images") if k in out}

    start = time.perf_counter()
    shapes = jax.eval_shape(sample, pipe.params)
    return {"torch_params": torch_counts, "jax_params": jax_counts, "trace_s": time.perf_counter() - start,
            "outputs": {k: f"{v.dtype}{list(v.shape)}" for k, v in shapes.items()},
            "params_match": torch_counts == jax_counts}


# ------------------------------------------------------------------------------------------------ report


def describe(preset: dict[str, Any], decode: bool) -> str:
    kind = {"ddim": "DDIM", "flow_euler": "flow Euler"}[SCHEDULER_KIND[preset["scheduler_config"]["_class_name"]]]
    return (f"{preset['family']}, {preset['dtype']}, batch {preset['batch']}, {preset['size']} px, {kind} "
            f"{preset['steps']} steps, CFG {preset['guidance']}, VAE decode {'included' if decode else 'excluded'}")


def print_report(r: dict[str, Any]) -> None:
    print(f"\nSampling, preset {r['preset']} ({r['setting']}, median of {r['runs']})  —  "
          f"{r['device']['jax']} / torch {r['device']['torch']}")
    print(f"{'implementation':34s} {'s / image':>10s} {'images/s':>9s} {'vs PyTorch':>11s}")
    for side, name in (("jax", "ctcal_jax sampling.generate (jit)"), ("torch", "PyTorch diffusers pipeline")):
        s = r[f"{side}_s_per_image"]
        print(f"{name:34s} {s:10.3f} {1 / s:9.3f} {r['torch_s_per_image'] / s:10.2f}×")
    print(f"JAX first call (trace + compile + one run) {r['jax_first_call_s']:.1f} s, not in the times above")
    check = r["output_check"]
    value = check.get("max_abs_diff", check.get("max_abs_rel_diff"))
    if r.get("breakdown_s"):
        steps = r["steps"]  # one denoiser forward per step, at the CFG batch (2 × batch rows)
        for side in ("jax", "torch"):
            p = r["breakdown_s"][side]
            call = r[f"{side}_s_per_image"] * r["batch"]
            rest = call - steps * p["denoiser"] - (p["vae_decode"] if r["vae_decode"] else 0.0)
            print(f"  {side:5s} per call {call:7.3f} s = {steps} × denoiser {1000 * p['denoiser']:7.1f} ms"
                  f" + VAE decode {1000 * p['vae_decode']:7.1f} ms + rest {rest:+7.3f} s (text, sampler, loop)")
    print(f"Same inputs, first outputs: {check['what']} {check['shape']}, "
          f"{'max |Δ|' if 'max_abs_diff' in check else 'max-abs relative diff'} {value:.2e}")


def print_dry_run(r: dict[str, Any]) -> None:
    print(f"Dry run, preset {r['preset']} ({r['setting']}): configs and shapes only, no weights.")
    for c in r["torch_params"]:
        print(f"{c:16s} PyTorch (meta) {r['torch_params'][c] / 1e6:10.2f} M   ctcal_jax (abstract) "
              f"{r['jax_params'][c] / 1e6:10.2f} M")
    print(f"generate traced in {r['trace_s']:.1f} s -> {', '.join(f'{k} {v}' for k, v in r['outputs'].items())}")
    print(f"parameter counts match: {r['params_match']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--runs", type=int, help="timed calls per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side after JAX's first call")
    parser.add_argument("--batch", type=int, help="prompts per call (default: the preset's)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the preset's)")
    parser.add_argument("--no-decode", dest="decode", action="store_false",
                        help="stop at the final latents on both sides (no VAE decoding)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time one denoiser forward (at the CFG batch) and one VAE decode per side: where "
                             "a call's time goes")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the configs without weights: PyTorch on the meta device, ctcal_jax traced "
                             "with abstract params (a CPU check of the GPU presets); nothing is timed")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    preset["batch"] = args.batch or preset["batch"]
    preset["steps"] = args.steps or preset["steps"]
    runs = args.runs or preset["runs"]
    results: dict[str, Any] = {"preset": args.preset, "setting": describe(preset, args.decode),
                               "dtype": preset["dtype"], "batch": preset["batch"], "steps": preset["steps"],
                               "guidance_scale": preset["guidance"], "size": preset["size"],
                               "scheduler": preset["scheduler_config"], "vae_decode": args.decode,
                               "config": {c: {"class": class_name(cfg), **cfg} for c, cfg in
                                          preset["components"].items()}}
    if args.dry_run:
        results.update(dry_run(preset, args.decode))
        print_dry_run(results)
        return write_json(args.json, results)
    results.update({**run_record(runs), **run(preset, runs, args.warmup, args.decode, args.breakdown)})
    print_report(results)
    return write_json(args.json, results)


if __name__ == "__main__":
    main()
