"""Samples/s of the full CTCAL train step: ctcal_jax's jitted step vs the same work in
PyTorch/diffusers/peft, on the same machine in one run.

    python benchmarks/ctcal_step.py --preset cpu-small     --json out/ctcal_step.json
    python benchmarks/ctcal_step.py --preset cpu-small-sd3 --json out/ctcal_step.json
    python benchmarks/ctcal_step.py --preset sd21-512      --json out/ctcal_step.json   # GPU host
    python benchmarks/ctcal_step.py --preset sd3m-1024     --json out/ctcal_step.json   # GPU host
    python benchmarks/ctcal_step.py --preset sd21-512 --dry-run --compile --json out/remat.json  # any host

One step (SD 2.1 family, SPEC §3), identical on both sides:
- CLIP text encoder with LoRA on its self-attention q/k/v/out (rank 4, alpha 4), one forward shared by
  teacher and student (the teacher sees it without gradient);
- UNet with LoRA on every attention q/k/v/out.0 (`attn1`, `attn2`); teacher forward at t_tea = 0
  without gradient, student forward at t_stu ~ U{0..999} with backward; both return the head- and
  layer-mean cross-attention maps of the 16×16 `attn2` layers;
- CTCAL loss: sub-token mean over the noun weights, Gaussian smoothing (k 3, σ 0.5, reflect),
  min-max; the map autoencoder (`ctcal.MapAutoencoder`); the four λ terms, the balance term on the
  softmax×100 re-weighted maps; λ_t = t_stu / 1000; plus the v-prediction diffusion loss;
- AdamW (β 0.9/0.999, ε 1e-8): lr 5e-5 UNet LoRA and autoencoder, 5e-6 text LoRA, weight decay 0.01.

The SD3 step (`cpu-small-sd3`, `sd3m-1024`; `families.mmdit` on the JAX side), identical on both sides:
- CLIP-L and CLIP-G (`CLIPTextModelWithProjection`) with LoRA on their self-attention q/k/v/out; their
  penultimate hidden states concatenated and zero-padded to the T5 width, then a precomputed T5 stream
  (the same random `[B, 256, C]` tensor on both sides; T5 is frozen); pooled = the two projections;
- the MM-DiT (`SD3Transformer2DModel`) with LoRA on `lora.DEFAULT_TARGETS`: every joint attention's
  `to_q/to_k/to_v/to_out.0` (the context projections `add_*_proj`/`to_add_out` are not adapted, on
  either side); flow matching with shift 3: t_stu logit-normal (indices into the shifted schedule,
  diffusers' SD3 scripts), the teacher at the fixed priority timestep (570.6) without gradient, input
  (1 − σ)·x0 + σ·ε, velocity target ε − x0;
- maps: the head-mean image→text block of every joint block's softmax, mean over blocks (PyTorch:
  `tests/tiny.JointProbsProcessor`, explicit softmax, on every block); the CTCAL loss on each text
  stream (CLIP 77, T5 256 tokens) with its own nouns, averaged over the two, SD3's λ (0.01, 1, 0.01, 0)
  and 5×5 smoothing; a sample with t_tea ≥ t_stu gets no CTCAL term; same optimizer groups.

ctcal_jax: the step `ctcal_jax.builder.build` makes (the trainer's), here on one device, attention `"auto"`: the fused kernel with maps rebuilt
from its log-sum-exp on GPU/TPU, the explicit path with its written-out backward on CPU.
PyTorch: diffusers `UNet2DConditionModel` and transformers `CLIPTextModel` with peft LoRA
(`add_adapter`), default SDPA attention except the captured 16×16 `attn2` layers, which get an
Attend-and-Excite processor forming the softmax explicitly; the CTCAL losses written in torch
(batched, no Python loop over nouns); `torch.optim.AdamW`.
CPU presets run fp32 on both sides; GPU presets run bf16 (JAX: bf16 frozen weights and compute,
fp32 LoRA/optimizer state; torch: bf16 frozen weights, fp32 LoRA, `torch.autocast(bfloat16)`, as the
diffusers LoRA training scripts do). PyTorch runs on CUDA when available, else on the CPU.

Both sides start from the same random weights (the PyTorch models' weights converted with the
`load_component` conversion; LoRA A/B and the autoencoder copied from JAX to torch, B non-zero so
the adapters matter). Sanity checks, printed, not asserted: the first step's loss terms and gradient
norm of both sides, with the JAX step's noise and timesteps fed to PyTorch; and the two CTCAL loss
implementations on the same peaked random maps (at step 0 the random models' maps are too flat for
the balance term to pass its margin, so it is 0 there).

Timing: the two steps take turns (round robin, so load changes on a shared machine hit both), JAX
compilation and the first steps excluded, `block_until_ready` / `cuda.synchronize`, median of `runs`.
`OMP_WAIT_POLICY` defaults to PASSIVE (PyTorch's OpenMP threads sleep instead of spinning at
barriers): on a loaded CPU the spinning default made PyTorch's step time vary 0.4–15 s.
MFU = FLOPs per step / median step time / the device's peak dense bf16 FLOP/s (GPU/TPU; null on
CPU). FLOPs per step: XLA's HLO cost analysis of the same step lowered with explicit attention
(`implementation="explicit"`, so attention counts as its two matmuls; the fused kernels are custom
calls XLA cannot count), i.e. model FLOPs without recomputation, the same count for both sides.

`--remat none|dots|full` sets what each block of the JAX denoiser and text encoders keeps for the
backward pass (`ctcal_jax/models/remat.py`; the PyTorch side is unchanged); FLOPs per step and MFU
stay model FLOPs, without the recomputation.

`--dry-run --compile [REMAT ...]` lowers and compiles the preset's full-size JAX step on this
machine's backend (abstract weights: nothing is allocated) once per remat policy (default: all three)
and prints lowering and compile times, XLA's `memory_analysis()` of the compiled step (temp: the
activations and scratch XLA plans; argument; output; alias), the bytes autodiff keeps for the
backward pass (the policy itself, whatever the backend's scheduler does with it), the compiled
step's FLOPs (recomputation included) and the process's peak RSS; `--json` gets them as `compile`.

Output: a table (speed-up JAX / PyTorch is the headline), the step-0 comparison, and `--json` with
`jax_samples_per_s`, `torch_samples_per_s`, `speedup`, `device`, `mfu` (JAX; `torch_mfu` beside it),
`flops_per_step`, per-run times and the step-0 terms. The script measures; it does not assert.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the train-step test set-up: prompts, tagger, CLIP tokenizer
# PyTorch shares the GPU with JAX here: JAX must not grab 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# On a CPU shared with other jobs, OpenMP threads spinning at barriers (GNU OpenMP's default) make
# PyTorch's step time jump 3–30× from one step to the next; sleeping waiters keep it stable. Set
# OMP_WAIT_POLICY=ACTIVE to measure the default on a machine of your own.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import step_setup  # noqa: E402  (tests/step_setup.py)
from benchmarks.common import (  # noqa: E402
    SD3_MEDIUM, SD21_UNET, describe_device, peak_flops, time_round_robin_all, torch_device, write_json,
)
from benchmarks.ctcal_torch import (  # noqa: E402
    ADAM, DENOISER, LORA_ALPHA, LORA_B_SCALE, LORA_RANK, PREDICTION_TYPE, SD3_SHIFT, TEXT_ENCODERS, TEXT_LORA_TARGETS,
    build_models, compare, components, ctcal_config, loss_check, make_torch_step, optimizer_groups, to_torch_side,
)
from conversion import known  # noqa: E402
from ctcal_jax import builder, ctcal, lora, schedules, text  # noqa: E402
from ctcal_jax import config as config_lib  # noqa: E402
from ctcal_jax.models import remat as remat_lib  # noqa: E402
from ctcal_jax.sharding import make_mesh  # noqa: E402
from ctcal_jax.train_step import Family, loss_fn, make_step_fn  # noqa: E402

# ---------------------------------------------------------------------------------------------- presets

# The SD 2.1 and SD3-medium text encoders (`conversion.known`), as transformers config kwargs.
OPENCLIP_H, CLIP_L, CLIP_G = ({k: v for k, v in c.items() if k != "architectures"}
                              for c in (known.OPENCLIP_H, known.CLIP_L, known.CLIP_G))

PRESETS: dict[str, dict[str, Any]] = {
    # SD 2.1's layout at 1/10 width, one layer per block: 4 levels, 64×64 latents, so the captured
    # maps are the third level's 16×16 as at 512 px; 77 tokens, a 4-layer CLIP, the real tokenizer.
    # Attention on levels 2 and 3 (32×32, 16×16), not on the 64×64 one: at this width a 4096-token
    # self-attention would be ~70 % of the FLOPs (L / 9C = 14 against SD 2.1's 1.4), whereas levels 2-3
    # here have the attention/convolution ratios of SD 2.1's levels 1-2. A few minutes on 2 cores.
    "cpu-small": dict(
        family="sd2", dtype="float32", batch=4, runs=11, latent=64, resolution=16,
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 128, 128), attention_head_dim=(1, 2, 4, 4), cross_attention_dim=128,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
            use_linear_projection=True,
        ),
        clip=dict(
            vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=128,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        ),
    ),
    # The real SD 2.1 UNet and OpenCLIP-H text encoder (random weights), 512 px, batch 8 per GPU.
    "sd21-512": dict(family="sd2", dtype="bfloat16", batch=8, runs=20, latent=64, resolution=16,
                     unet=SD21_UNET, clip=OPENCLIP_H),
    # SD3-style at toy size: MM-DiT of 4 joint blocks (4 heads × 32), 32×32 latents (16×16 maps, as
    # the 256 image tokens), CLIP-L/G-like encoders (2 layers, widths 64/128, projections), a random
    # 256-token T5 stream of width 256 (the joint attention width). A few minutes on 2 cores.
    "cpu-small-sd3": dict(
        family="sd3", dtype="float32", batch=4, runs=7, latent=32, resolution=16,
        rng_seed=5,  # step 0 then draws t_stu = 601.8, 927.5, 674.9, 349.7: the last is below t_tea (no CTCAL term)
        transformer=dict(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=128,
            pooled_projection_dim=192, pos_embed_max_size=32,
        ),
        clip=dict(
            vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        ),
        clip_2=dict(
            vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=128,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        ),
    ),
    # SD3-medium (MM-DiT 2B, CLIP-L, CLIP-G; random weights) at 1024 px: 128×128 latents, 64×64 maps
    # of all 24 joint blocks, the T5 stream precomputed (random, 256 × 4096). Batch 2 per GPU: the
    # PyTorch side keeps every block's [B, 24, 4429, 4429] probabilities for the backward.
    "sd3m-1024": dict(family="sd3", dtype="bfloat16", batch=2, runs=10, latent=128, resolution=64,
                      transformer=SD3_MEDIUM, clip=CLIP_L, clip_2=CLIP_G),
}

# ------------------------------------------------------------------------------------------- the batch


def make_batch(preset: dict[str, Any]) -> dict[str, np.ndarray]:
    """Prompts with nouns (and one without), real CLIP tokens (padded with "!"), noun weights from a
    dictionary tagger, Gaussian latents `[B, latent, latent, 4 | 16]`: `tests/step_setup.batch`. SD3
    adds the T5 stream's noun arrays (tiny T5 tokenizer) and a random precomputed T5 stream
    `[B, 256, joint_attention_dim]` (the same tensor on both sides)."""
    family, b = preset["family"], preset["batch"]
    batch = step_setup.batch(family, b, latent=preset["latent"])
    if family == "sd3":
        width = preset["transformer"]["joint_attention_dim"]
        batch["t5_embeds"] = np.random.RandomState(1).randn(b, 256, width).astype(np.float32)
    return batch


# --------------------------------------------------------------------------------------- ctcal_jax side


def jax_trainable(family: str, frozen: dict[str, Any], resolution: int, seed: int = 0) -> dict[str, Any]:
    """LoRA on the denoiser's attention (`lora.DEFAULT_TARGETS`) and the CLIP self-attention, B drawn
    small but non-zero, and the map autoencoder: the trainable tree of the step (float32)."""
    keys = jax.random.split(jax.random.key(seed), 4)  # denoiser, text encoder, autoencoder, B draws
    denoiser, texts = DENOISER[family], TEXT_ENCODERS[family]
    text_keys = [keys[1], *jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), len(texts) - 1)]
    trainable = {denoiser: lora.init(keys[0], frozen[denoiser], rank=LORA_RANK, alpha=LORA_ALPHA),
                 "ae": ctcal.init_autoencoder(keys[2], resolution)}
    for key, c in zip(text_keys, texts):
        trainable[c] = lora.init(key, frozen[c], targets=TEXT_LORA_TARGETS, rank=LORA_RANK, alpha=LORA_ALPHA)
    leaves, tree = jax.tree_util.tree_flatten_with_path(trainable)
    draws = jax.random.split(keys[3], len(leaves))
    return jax.tree.unflatten(tree, [
        LORA_B_SCALE * jax.random.normal(k, x.shape) if jax.tree_util.keystr(p).endswith("['B']") else x
        for (p, x), k in zip(leaves, draws)])


def bench_config(family: str, preset: dict[str, Any], remat: str | None = None):
    """The training config of the JAX side (what `builder.build` reads): LoRA rank/alpha 4 on the
    denoiser's attention and the CLIP self-attention, SPEC's AdamW groups, the SPEC loss of the
    family, maps at the preset's resolution, one device. `remat` defaults to the preset's."""
    c = config_lib.base_config()
    c.lora.rank, c.lora.alpha, c.lora.text_targets = LORA_RANK, LORA_ALPHA, TEXT_LORA_TARGETS
    c.optim.groups = tuple((f"^{name}/", lr, wd) for name, (lr, wd) in optimizer_groups(family).items())
    c.optim.b1, c.optim.b2, c.optim.eps = ADAM["b1"], ADAM["b2"], ADAM["eps"]
    config_lib.set_ctcal(c, ctcal_config(family))
    c.ctcal.map_resolution = preset["resolution"]
    c.model.remat = remat or preset.get("remat", "none")
    c.mesh.data, c.mesh.fsdp = 1, 1
    c.sharding.frozen = ((r".*", ()),)
    return c


def bench_pipeline(family: str, modules: dict[str, Any], frozen: Any, preset: dict[str, Any],
                   explicit: bool = False) -> builder.Pipeline:
    """The JAX side's models as the builder takes them; `explicit` rebuilds every module with
    `implementation="explicit"` (every attention matmul visible to XLA's cost analysis)."""
    if explicit:
        modules = {k: m.clone(implementation="explicit") for k, m in modules.items()}
    texts = {c: modules[c] for c in TEXT_ENCODERS[family]}
    if family == "sd2":
        encoders = text.PromptEncoders("sd", {}, texts, {"text_encoder": 77})
        scheduler = {"prediction_type": PREDICTION_TYPE}
    else:
        encoders = text.PromptEncoders("sd3", {}, texts, {"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 256},
                                       joint_attention_dim=preset["transformer"]["joint_attention_dim"])
        scheduler = {"shift": SD3_SHIFT}
    return builder.Pipeline(family, modules[DENOISER[family]], encoders, frozen, scheduler)


def jax_family(family: str, modules: dict[str, Any], preset: dict[str, Any], explicit: bool = False,
               remat: str | None = None):
    """The step's `Family` from the builder; `explicit` and `remat` as in `bench_pipeline`/`bench_config`."""
    return builder.make_family(bench_config(family, preset, remat), bench_pipeline(family, modules, {}, preset, explicit))


def build_jax_step(family: str, modules: dict[str, Any], frozen, trainable, preset: dict[str, Any],
                   remat: str | None = None) -> builder.Run:
    """`builder.build` on a one-device mesh (the torch side uses one device); `frozen` and `trainable`
    may be abstract (then `run.step.jitted` lowers and compiles)."""
    mesh = make_mesh(1, 1, jax.devices()[:1])
    return builder.build(bench_config(family, preset, remat), bench_pipeline(family, modules, frozen, preset),
                         mesh=mesh, trainable=trainable)


def jax_step0_draws(family: str, rng: jax.Array, batch_size: int,
                    latent_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The noise and timesteps the JAX step draws at step 0: `make_step_fn` folds the step (0) and
    the micro-batch index (0) into `rng`; both families split that key into (noise, t_stu, t_tea).
    SD 2.x: `{noise, t_stu}` (t_tea = 0); SD3: also `sigma_stu` (looked up with t_stu) and `t_tea`."""
    key = jax.random.fold_in(jax.random.fold_in(rng, 0), 0)
    r_noise, r_t, r_tea = jax.random.split(key, 3)
    out = {"noise": jax.random.normal(r_noise, (batch_size, *latent_shape), jnp.float32)}
    if family == "sd2":
        out["t_stu"] = schedules.uniform_timesteps(r_t, batch_size)
    else:
        config = ctcal_config(family)
        schedule = schedules.flow_match_schedule(config.num_train_timesteps, SD3_SHIFT)
        out["t_stu"], out["sigma_stu"] = schedules.sample_flow_timesteps(r_t, schedule, batch_size)
        out["t_tea"] = ctcal.teacher_timesteps(r_tea, out["t_stu"], config, "logit_normal", SD3_SHIFT)
    return {k: np.asarray(v) for k, v in out.items()}


def merged_lora(fam: Family) -> Family:
    """`fam` as the step was before LoRA was applied unmerged: every adapter merged into a full-size
    copy of its weights inside the step (`W + (α/r)·A@B`, differentiated through). For the FLOP
    comparison of `--dry-run` only."""
    def forward(frozen, trainable, batch, rng):
        adapted = {c: lp for c, lp in trainable.items() if c in frozen}
        frozen = {**frozen, **{c: lora.merge(frozen[c], lp) for c, lp in adapted.items()}}
        return fam.forward(frozen, {k: v for k, v in trainable.items() if k not in adapted}, batch, rng)

    return dataclasses.replace(fam, forward=forward)


def step_flops(family: str, modules, preset, optimizer, frozen, state, batch, rng,
               merged: bool = False) -> float | None:
    """Model FLOPs of one step: XLA's cost analysis of the step lowered with explicit attention
    (every attention matmul visible; no compilation, abstract shapes only) and without remat (no
    recomputation counted, whatever the preset runs); `merged` counts the step with its LoRA merged
    (`merged_lora`). None, with a warning, where the backend offers no cost analysis."""
    fam = jax_family(family, modules, preset, explicit=True, remat="none")
    fam = merged_lora(fam) if merged else fam
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (frozen, state, batch, rng))
    try:
        return float(jax.jit(make_step_fn(fam, optimizer)).lower(*shapes).cost_analysis()["flops"])
    except Exception as e:  # noqa: BLE001 — a missing FLOP count must not cost the timing
        print(f"warning: no XLA cost analysis on this backend ({type(e).__name__}: {e}); MFU not computed")
        return None


# ------------------------------------------------------------------------------------------------ set-up


def abstract_setup(preset: dict[str, Any]) -> SimpleNamespace:
    """The JAX step's inputs at the preset's full size as `jax.ShapeDtypeStruct`s (no weights, no
    PyTorch model): `family, modules, frozen, trainable, optimizer, state, batch, rng`."""
    family, dtype = preset["family"], jnp.dtype(preset["dtype"])
    modules, frozen = {}, {}
    for name, (cls, conversion, config) in components(preset).items():
        fam = importlib.import_module(f"conversion.{conversion}")
        if conversion == "clip":  # transformers names the class in `architectures`
            config = {**config, "architectures": [cls]}
        modules[name] = fam.build(config, dtype=dtype)
        frozen[name] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                                    fam.abstract_params(modules[name], config))
    trainable = jax.eval_shape(lambda f: jax_trainable(family, f, preset["resolution"]), frozen)
    run = build_jax_step(family, modules, frozen, trainable, preset)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(preset))
    return SimpleNamespace(family=family, modules=modules, frozen=frozen, trainable=trainable,
                           optimizer=run.optimizer, state=run.state, batch=batch, rng=jax.random.key(0))


def dry_run(preset: dict[str, Any]) -> dict[str, Any]:
    """The JAX step at the preset's full size with abstract weights: no weights, no PyTorch model,
    no compilation, so a CPU can check a GPU preset before a GPU is rented. Traces the whole step
    (`jax.eval_shape`; any shape or dtype error surfaces here) and counts its model FLOPs the way the
    timed run does. Returns parameter counts, the step's metric names and FLOPs per step."""
    s = abstract_setup(preset)
    new_state, metrics = jax.eval_shape(make_step_fn(jax_family(s.family, s.modules, preset), s.optimizer),
                                        s.frozen, s.state, s.batch, s.rng)
    def specs(tree: Any) -> Any:
        return jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    if specs(new_state) != specs(s.state):
        raise AssertionError("dry run: the step changes the state's structure, shapes or dtypes")

    def count(tree: Any) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    return {
        "remat": preset.get("remat", "none"),
        "frozen_params": {k: count(v) for k, v in s.frozen.items()},
        "trainable_params": {k: count(v) for k, v in s.trainable.items()},
        "metrics": {k: f"{v.dtype}{list(v.shape)}" for k, v in metrics.items()},
        "flops_per_step": step_flops(s.family, s.modules, preset, s.optimizer, s.frozen, s.state, s.batch, s.rng),
        "flops_per_step_lora_merged": step_flops(s.family, s.modules, preset, s.optimizer, s.frozen, s.state,
                                                 s.batch, s.rng, merged=True),
    }


def compile_policies(preset: dict[str, Any], policies: list[str]) -> list[dict[str, Any]]:
    """Lower and compile the full-size step (`make_train_step`'s jit, one device, abstract weights) on
    this machine's backend once per remat policy. Per policy: lowering and compilation wall time,
    XLA's `memory_analysis()` of the compiled step (temp = the activations and scratch XLA plans,
    argument, output, alias = donated state reused for the output, generated code), the bytes JAX's
    autodiff keeps for the backward pass (`models.remat.kept_bytes` of the loss w.r.t. the trainable
    tree: the policy itself, before any backend schedules it), the compiled step's FLOPs (XLA's cost
    analysis: recomputation included) and this process's peak RSS so far."""
    s = abstract_setup(preset)
    rows = []
    for policy in policies:
        fam = jax_family(s.family, s.modules, preset, remat=policy)

        def loss(trainable, frozen, batch, fam=fam):
            frozen, batch = jax.lax.stop_gradient((frozen, batch))
            return loss_fn(fam, trainable, frozen, batch, s.rng)[0]
        kept = remat_lib.kept_bytes(loss, s.trainable, s.frozen, s.batch)
        step = build_jax_step(s.family, s.modules, s.frozen, s.trainable, preset, remat=policy).step
        start = time.perf_counter()
        lowered = step.jitted.lower(s.frozen, s.state, s.batch, s.rng)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
        mem = compiled.memory_analysis()
        try:
            flops = float(compiled.cost_analysis()["flops"])
        except Exception:  # noqa: BLE001 — a backend without cost analysis still gets its memory table
            flops = None
        rows.append({
            "remat": policy, "lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
            "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
            "generated_code_bytes": mem.generated_code_size_in_bytes, "kept_for_backward_bytes": kept,
            "compiled_flops": flops, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })
        print_compile_row(rows[-1], header=len(rows) == 1)
        del compiled, lowered
    return rows


# ------------------------------------------------------------------------------------------------ report


def print_comparison(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'metric':22s} {'ctcal_jax':>13s} {'PyTorch':>13s} {'rel. diff':>10s}")
    for k, v in table.items():
        print(f"{k:22s} {v['jax']:13.6g} {v['torch']:13.6g} {v['rel_diff']:10.2e}")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def print_report(results: dict[str, Any]) -> None:
    r = results
    print(f"\nCTCAL train step, preset {r['preset']} ({r['dtype']}, batch {r['batch']}, remat {r['remat']}, "
          f"median of {r['runs']})  —  "
          f"{r['device']['jax']} / torch {r['device']['torch']}")
    print(f"{'implementation':30s} {'step (ms)':>10s} {'samples/s':>10s} {'vs PyTorch':>11s} "
          f"{'TFLOP/s':>8s} {'MFU':>7s}")
    for side, name in (("jax", "ctcal_jax (jit)"), ("torch", "PyTorch (diffusers + peft)")):
        mfu = r["mfu"] if side == "jax" else r["torch_mfu"]
        mfu_text = _fmt(None if mfu is None else 100 * mfu, "6.1f", "%")
        print(f"{name:30s} {1000 * r[f'{side}_step_s']:10.1f} {r[f'{side}_samples_per_s']:10.2f} "
              f"{r[f'{side}_samples_per_s'] / r['torch_samples_per_s']:10.2f}× "
              f"{_fmt(r[f'{side}_tflops_per_s'], '8.3f'):>8s} {mfu_text:>7s}")
    print(f"FLOPs per step {_fmt(r['flops_per_step'], '.4g')} ({r['flops_method']}); "
          f"JAX first step (compilation) {r['jax_first_step_s']:.1f} s")
    print_comparison("Step 0, same weights, noise and timesteps:", r["step0"])
    print("step-0 timesteps: " + ", ".join(f"{k} {np.round(v, 1).tolist()}" for k, v in r["step0_timesteps"].items()))
    print_comparison("CTCAL terms alone, same peaked random maps and autoencoder:", r["loss_check"])


def print_dry_run(r: dict[str, Any]) -> None:
    def millions(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v / 1e6:.4g} M" for k, v in counts.items())
    print(f"Dry run, preset {r['preset']} ({r['dtype']}, batch {r['batch']}, remat {r['remat']}): "
          "the step traces at full size.")
    print(f"frozen parameters:    {millions(r['frozen_params'])}")
    print(f"trainable parameters: {millions(r['trainable_params'])}")
    print(f"metrics: {', '.join(f'{k} {v}' for k, v in r['metrics'].items())}")
    print(f"FLOPs per step {_fmt(r['flops_per_step'], '.4g')} (model FLOPs, explicit attention), "
          f"per sample {_fmt(r['flops_per_step'] and r['flops_per_step'] / r['batch'], '.4g')}")
    merged = r.get("flops_per_step_lora_merged")
    if merged and r["flops_per_step"]:
        print(f"FLOPs per step with the LoRA merged into the weights inside the step (the old way): "
              f"{merged:.4g}, {merged / r['flops_per_step']:.3f}× the unmerged step")


def print_compile_row(r: dict[str, Any], header: bool) -> None:
    gib = 2.0 ** 30
    if header:
        print(f"{'remat':6s} {'lower (s)':>9s} {'compile (s)':>11s} {'temp GiB':>9s} {'args GiB':>9s} "
              f"{'out GiB':>8s} {'alias GiB':>9s} {'code MiB':>8s} {'kept GiB':>9s} {'TFLOP':>7s} "
              f"{'peak RSS GiB':>12s}")
    print(f"{r['remat']:6s} {r['lower_s']:9.1f} {r['compile_s']:11.1f} {r['temp_bytes'] / gib:9.3f} "
          f"{r['argument_bytes'] / gib:9.3f} {r['output_bytes'] / gib:8.3f} {r['alias_bytes'] / gib:9.3f} "
          f"{r['generated_code_bytes'] / 2 ** 20:8.1f} {r['kept_for_backward_bytes'] / gib:9.3f} "
          f"{_fmt(r['compiled_flops'] and r['compiled_flops'] / 1e12, '7.2f')} {r['peak_rss_bytes'] / gib:12.2f}",
          flush=True)


# -------------------------------------------------------------------------------------------------- main


def setup(preset: dict[str, Any]) -> SimpleNamespace:
    """Both sides from the same weights, and the checks that must run before either side updates."""
    family = preset["family"]
    torch_models, modules, frozen = build_models(family, preset)
    trainable = jax_trainable(family, frozen, preset["resolution"])
    models_t, ae_t, lora_counts = to_torch_side(family, torch_models, trainable, preset)
    del torch_models
    batch = make_batch(preset)
    torch_step = make_torch_step(family, models_t, ae_t, batch, preset)
    checks = {"loss_check": loss_check(family, trainable["ae"], ae_t, batch, preset["resolution"])}
    run = build_jax_step(family, modules, frozen, trainable, preset)
    step, state, optimizer = run.step, run.state, run.optimizer
    batch_j, rng = jax.tree.map(jnp.asarray, batch), jax.random.key(preset.get("rng_seed", 1))
    flops = step_flops(family, modules, preset, optimizer, frozen, state, batch_j, rng)
    return SimpleNamespace(family=family, torch_step=torch_step, jax_step=step, state=state, batch=batch,
                           batch_j=batch_j, rng=rng, flops=flops, checks=checks, lora_counts=lora_counts)


def run_jax(s: SimpleNamespace) -> dict[str, jax.Array]:
    """One JAX step (the state is donated and replaced), finished."""
    s.state, metrics = s.jax_step(s.state, s.batch_j, s.rng)
    return jax.block_until_ready(metrics)


def step0(s: SimpleNamespace) -> float:
    """Step 0 on both sides with the same noise and timesteps; fills `s.checks["step0"]`. Returns the
    wall time of JAX's first step (compilation included)."""
    start = time.perf_counter()
    jax_m = jax.device_get(run_jax(s))
    compile_s = time.perf_counter() - start
    draws = jax_step0_draws(s.family, s.rng, s.batch["latents"].shape[0], s.batch["latents"].shape[1:])
    dev = torch_device()
    draws["noise"] = draws["noise"].transpose(0, 3, 1, 2)
    if s.family == "sd2":
        draws["t_stu"] = draws["t_stu"].astype(np.int64)
    s.checks["step0_timesteps"] = {k: draws[k].tolist() for k in ("t_stu", "t_tea") if k in draws}
    draws.pop("t_tea", None)  # the torch step sets its own (fixed) teacher timestep
    torch_m = s.torch_step(**{k: torch.from_numpy(v.copy()).to(dev) for k, v in draws.items()})
    s.checks["step0"] = compare(jax_m, torch_m)
    return compile_s


def summarise(s: SimpleNamespace, preset: dict[str, Any], times: dict[str, list[float]],
              peak: float | None) -> dict[str, Any]:
    b, flops = preset["batch"], s.flops
    med = {k: statistics.median(v) for k, v in times.items()}

    def per_s(side: str, denominator: float = 1.0) -> float | None:
        return None if flops is None else flops / med[side] / denominator
    return {
        "jax_samples_per_s": b / med["jax"], "torch_samples_per_s": b / med["torch"],
        "speedup": med["torch"] / med["jax"],
        "jax_step_s": med["jax"], "torch_step_s": med["torch"], "step_times_s": times,
        "flops_per_step": flops,
        "flops_method": "XLA HLO cost analysis of the step lowered with explicit attention (model FLOPs)",
        "jax_tflops_per_s": per_s("jax", 1e12), "torch_tflops_per_s": per_s("torch", 1e12),
        "peak_bf16_flops": peak,
        "mfu": None if peak is None else per_s("jax", peak),
        "torch_mfu": None if peak is None else per_s("torch", peak),
        **s.checks,
        "lora_modules": s.lora_counts, "captured_torch_layers": s.torch_step.captured_layers,
        "config": {k: preset[k] for k in ("family", "latent", "resolution", "unet", "transformer", "clip", "clip_2")
                   if k in preset},
    }


def run(preset: dict[str, Any], runs: int, warmup: int, peak: float | None) -> dict[str, Any]:
    s = setup(preset)
    compile_s = step0(s)
    times = time_round_robin_all({"jax": lambda: run_jax(s), "torch": s.torch_step}, runs, warmup)
    return {"dtype": preset["dtype"], "batch": preset["batch"], "runs": runs, "remat": preset.get("remat", "none"),
            **summarise(s, preset, times, peak), "jax_first_step_s": compile_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--runs", type=int, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side after step 0")
    parser.add_argument("--batch", type=int, help="override the preset's batch size")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s, for MFU (default: table)")
    parser.add_argument("--remat", choices=sorted(remat_lib.POLICIES), default="none",
                        help="what each block of the JAX denoiser and text encoders keeps for the backward "
                             "pass (ctcal_jax/models/remat.py); FLOPs per step are counted without it")
    parser.add_argument("--dry-run", action="store_true",
                        help="trace the JAX step at full size with abstract weights and count its FLOPs; "
                             "nothing is timed, no PyTorch model is built (a CPU check of a GPU preset)")
    parser.add_argument("--compile", nargs="*", choices=sorted(remat_lib.POLICIES), metavar="REMAT",
                        help="with --dry-run: also lower and compile the full-size step on this machine for "
                             "each remat policy given (none given: none, dots, full) and print lowering and "
                             "compile times and XLA's memory analysis per policy")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    preset["batch"] = args.batch or preset["batch"]
    preset["remat"] = args.remat
    if args.compile is not None and not args.dry_run:
        parser.error("--compile needs --dry-run (it compiles the abstract full-size step)")
    if args.dry_run:
        results = {"preset": args.preset, "batch": preset["batch"], "dtype": preset["dtype"], **dry_run(preset)}
        print_dry_run(results)
        if args.compile is not None:
            policies = args.compile or ["none", "dots", "full"]
            results["device"] = describe_device()
            results["xla_flags"] = os.environ.get("XLA_FLAGS", "")
            print(f"\nCompiled step per remat policy, {results['device']['jax']} "
                  f"({results['device']['cpu']}), XLA_FLAGS={results['xla_flags']!r}:")
            results["compile"] = compile_policies(preset, policies)
        return write_json(args.json, results)
    device = {**describe_device(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    results = {"preset": args.preset, "device": device,
               "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               **run(preset, args.runs or preset["runs"], args.warmup, peak_flops(args.peak_tflops))}
    print_report(results)
    return write_json(args.json, results)


if __name__ == "__main__":
    main()
