"""The training config: every key a run reads, with SPEC defaults. `configs/*.py` start from here.

`base_config()` returns a locked `ml_collections.ConfigDict`: an experiment sets values, and a key
that is not below (a typo, `--config.no_such_key=1`) is an error instead of a silently ignored
setting. Keys (API.md's "every training config has" marked *):

- `model.pretrained`* — a diffusers folder, a hub id, or `builtin:tiny-sd2` / `builtin:tiny-sd3`
  / `builtin:tiny-flux` (tiny random pipelines written by the project, for CPU runs);
  `model.dtype` (weights), `model.compute_dtype` ("" = `model.dtype`), `model.remat` (none | dots | full).
- `objective`: ctcal | diffusion (GORS when the data carries rewards) | taca (SD3, FLUX.1: SPEC §4);
  FLUX.1 trains diffusion and taca only.
- `ctcal.*`: SPEC §3 (`teacher_t` -1 = the sampler's priority timestep), `map_resolution` (r of the
  captured r×r maps), `capture_blocks` (SD3; None = all).
- `taca.gamma`, `taca.t_threshold`; `flow.logit_mean`, `flow.logit_std` (SD3's training sampler; the
  shift is the pipeline scheduler's); `flow.guidance` (FLUX.1-dev's embedded guidance while training,
  3.5 as diffusers' FLUX script; FLUX.1's timesteps are uniform, `families.flux`).
- `lora.rank`, `lora.alpha`, `lora.targets` (denoiser modules, regex over diffusers module paths),
  `lora.text_targets` (CLIP encoders; "" trains none).
- `optim.groups`: `((regex over trainable paths, lr, weight decay), ...)`, first match wins, an
  unmatched trainable leaf is an error; `b1`, `b2`, `eps`, `warmup_steps`, `accum_steps`,
  `max_grad_norm` (0 = none).
- `mesh.data`*, `mesh.fsdp`* (-1 = all remaining devices); `sharding.frozen` / `sharding.state`:
  `((regex, axes), ...)` rules (`ctcal_jax.sharding`).
- `data.*`: `ctcal_jax.data.default_config()`.
- `total_steps`*, `batch_size`* (global), `seed`*, `log_every`*, `checkpoint_every`*,
  `keep_checkpoints`, `sample_every` (attention figures of the data's first examples; 0 = never),
  `num_train_timesteps`, `compilation_cache_dir` ("" = none), `halt_on_nonfinite`.
- `eval.*`: the shapes world's evaluation during training (`ctcal_jax.evaluation`; the trainer
  ignores it for other data, and a resumed run may change it): `every` (steps; 0 = never), `n`
  (prompts per category), `split` ("validation", or "test" with the held-out compositions), `seed`,
  `num_inference_steps`, `guidance_scale`.
- `sample.*`: what `python -m ctcal_jax.sample` reads (the trainer ignores it, and a resumed run may
  change it): `scheduler` ("" = the family's default, DDIM for SD 1.x/2.x, flow-matching Euler for
  SD3 and FLUX.1), `num_inference_steps` and `guidance_scale` (0 = `sampling.generate`'s default for
  the pipeline: 50 and 7.5, FLUX.1 28 and 3.5 as FluxPipeline; FLUX.1's guidance is the embedded
  one), `true_cfg_scale` (FLUX.1's true CFG with `negative_prompt` when > 1), `negative_prompt`,
  `height`/`width` (0 = the model's default), `seed` (sample j of every prompt uses `seed + j`, as GenEval's and
  T2I-CompBench's scripts reseed per prompt), `n_per_prompt`, `batch_size` (images per compiled
  call), `layout` (plain | t2i-compbench | geneval), `overlays`, `lora` ("" or a LoRA file or folder,
  e.g. a training run's `lora/`), `taca_cond_only`, `tagger` ("stanza" or `module:function`, prompt ->
  `[(word, upos, start_char, end_char)]`: the subjects of IterRef, overlays and the sweep's scorer),
  `iterref.{lr, n_iters, loss, gsn_start, gsn_end, gsn_lr}` (SPEC §6; GSN guidance at the step
  indices `[gsn_start, gsn_end)`, none when they are equal).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from ctcal_jax import ctcal, lora
from ctcal_jax.data import default_config as data_config
from ctcal_jax.data.synthetic import DEMO_PROMPTS

TEXT_TARGETS = r"self_attn\.(q|k|v|out)_proj$"
# Learning-rate groups (SPEC §3, SD 2.1): denoiser LoRA and autoencoder 5e-5, text LoRA 5e-6, wd 0.01.
SD2_GROUPS = ((r"^(unet|ae)/", 5e-5, 0.01), (r"^text_encoder", 5e-6, 0.01))
# SD3: 5e-5 / 1e-5, weight decay 1e-4 (denoiser, autoencoder) / 1e-3 (text).
SD3_GROUPS = ((r"^(transformer|ae)/", 5e-5, 1e-4), (r"^text_encoder", 1e-5, 1e-3))


def base_config() -> ml_collections.ConfigDict:
    """Every key, SD 2.1 CTCAL defaults (SPEC §3); locked (module docstring)."""
    c = ml_collections.ConfigDict()
    c.model = dict(pretrained="", dtype="float32", compute_dtype="", remat="none")
    c.objective = "ctcal"
    c.ctcal = dict(
        lambdas=(0.01, 1.0, 0.01, 0.1), tau=0.2, kernel_size=3, sigma=0.5, reweight_scale=100.0,
        tokens="nouns", semantic=True, regularizer=True, adaptive_weight=True, adjectives=False,
        teacher="priority", teacher_t=-1.0, map_resolution=16, capture_blocks=None,
    )
    c.taca = dict(gamma=1.2, t_threshold=970.0)
    c.flow = dict(logit_mean=0.0, logit_std=1.0, guidance=3.5)
    c.lora = dict(rank=4, alpha=4.0, targets=lora.DEFAULT_TARGETS, text_targets=TEXT_TARGETS)
    c.optim = dict(groups=SD2_GROUPS, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, accum_steps=1,
                   max_grad_norm=0.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sharding = dict(frozen=((r".*/kernel$", ("fsdp_largest",)), (r".*", ())), state=((r".*", ()),))
    c.data = data_config()
    c.total_steps = 50_000
    c.batch_size = 64
    c.seed = 0
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.sample_every = 1000
    c.num_train_timesteps = 1000
    c.compilation_cache_dir = ""
    c.halt_on_nonfinite = True
    c.eval = dict(every=0, n=16, split="validation", seed=0, num_inference_steps=25, guidance_scale=5.0)
    c.sample = dict(
        scheduler="", num_inference_steps=0,
        guidance_scale=0.0,  # 0: the pipeline's default; SD3/3.5's pipelines use 7.0 (sd3_defaults)
        true_cfg_scale=1.0,
        negative_prompt="", height=0, width=0, seed=0, n_per_prompt=1, batch_size=4, layout="plain",
        overlays=False, lora="", taca_cond_only=False, tagger="stanza",
        # lr: our choice (the paper's are not public, SPEC §6): pick it with `--sweep-steps`.
        iterref=dict(lr=1e-2, n_iters=50, loss="cn+iou", gsn_start=0, gsn_end=0, gsn_lr=0.0),
    )
    # `capture_blocks` may be None or a tuple: a placeholder would fix one type.
    c.ctcal.capture_blocks = ml_collections.config_dict.placeholder(tuple)
    c.lock()
    return c


def sd3_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """SPEC §3's SD3 settings on top of `base_config()`: λ4 = 0, 5×5 smoothing of 64×64 maps (1024 px),
    SD3 learning rates, 20 000 steps, batch 64 (4 per device × 4 devices × 4 accumulation); sampling
    as diffusers' SD3 pipeline and SPEC §6: 28 flow-matching steps, CFG 7.0."""
    c.ctcal.lambdas = (0.01, 1.0, 0.01, 0.0)
    c.ctcal.kernel_size = 5
    c.ctcal.map_resolution = 64
    c.optim.groups = SD3_GROUPS
    c.optim.accum_steps = 4
    c.total_steps = 20_000
    c.data.resolution = 1024
    c.data.latent_channels = 16
    c.sample.num_inference_steps = 28
    c.sample.guidance_scale = 7.0
    return c


def check(c: ml_collections.ConfigDict) -> None:
    """The values a run cannot start with, each a one-line ValueError naming the key (types are the
    locked ConfigDict's; this checks ranges). `builder.build` calls it."""

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            value = c
            for part in key.split("."):
                value = value[part]
            raise ValueError(f"config.{key}={value!r}: expected {expected}")

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    need(c.batch_size >= 1, "batch_size", "a positive number of examples per step (all hosts)")
    need(c.total_steps >= 1, "total_steps", "at least 1")
    need(c.optim.accum_steps >= 1, "optim.accum_steps", "at least 1 (micro-batches per step)")
    need(c.lora.rank >= 1, "lora.rank", "at least 1")
    need(finite(c.lora.alpha) and c.lora.alpha > 0, "lora.alpha", "a finite number > 0 (the scale is alpha / rank)")
    need(len(c.optim.groups) > 0, "optim.groups", "at least one (regex, lr, weight decay) group")
    for i, group in enumerate(c.optim.groups):
        ok = len(group) == 3 and finite(group[1]) and group[1] >= 0 and finite(group[2]) and group[2] >= 0
        need(ok, "optim.groups", f"(regex, lr ≥ 0, weight decay ≥ 0) triples; group {i} is {tuple(group)!r}")
    need(finite(c.optim.max_grad_norm) and c.optim.max_grad_norm >= 0, "optim.max_grad_norm", "≥ 0 (0: no clipping)")
    need(c.optim.warmup_steps >= 0, "optim.warmup_steps", "≥ 0")
    need(finite(c.taca.gamma) and c.taca.gamma > 0, "taca.gamma", "a finite temperature > 0 (SPEC §4: 1.2)")
    need(finite(c.taca.t_threshold) and 0 <= c.taca.t_threshold <= c.num_train_timesteps, "taca.t_threshold",
         f"a timestep in [0, num_train_timesteps={c.num_train_timesteps}]")
    need(finite(c.flow.guidance) and c.flow.guidance >= 0, "flow.guidance",
         "a finite guidance scale ≥ 0 (FLUX.1-dev's embedded guidance while training; diffusers uses 3.5)")
    need(len(c.ctcal.lambdas) == 4 and all(finite(x) and x >= 0 for x in c.ctcal.lambdas), "ctcal.lambdas",
         "four finite weights ≥ 0 (λ1..λ4, SPEC §3)")
    need(finite(c.ctcal.tau) and c.ctcal.tau > 0, "ctcal.tau", "a finite temperature > 0")
    need(c.ctcal.teacher_t < c.num_train_timesteps, "ctcal.teacher_t",
         f"-1 (the sampler's priority timestep) or a timestep below num_train_timesteps={c.num_train_timesteps}")
    need(c.log_every >= 1 and c.checkpoint_every >= 1, "log_every" if c.log_every < 1 else "checkpoint_every",
         "at least 1 step")


# The paper's ablations (Table 4; Table 6 for adjectives), as `--config configs/X.py:NAME` variants.
ABLATIONS = {
    "all_tokens": ("ctcal.tokens", "all"),  # every real token its own group instead of the nouns
    "pixel_only": ("ctcal.semantic", False),  # λ2, λ3 and the autoencoder dropped
    "no_regularizer": ("ctcal.regularizer", False),  # λ4 dropped
    "no_adaptive": ("ctcal.adaptive_weight", False),  # λ_t = 1
    "adjectives": ("ctcal.adjectives", True),  # ADJ words join the nouns
}


def variants(arg: str) -> list[str]:
    """`"runlocal,pixel_only"` -> `["runlocal", "pixel_only"]`; raises ValueError for an unknown name."""
    names = [a for a in arg.split(",") if a]
    unknown = [a for a in names if a not in ABLATIONS and a != "runlocal"]
    if unknown:
        raise ValueError(f"unknown config variant(s) {unknown}; known: runlocal, {', '.join(ABLATIONS)}")
    return names


def apply_ablations(c: ml_collections.ConfigDict, names: list[str]) -> ml_collections.ConfigDict:
    """Set the switches of the named ablations (`ABLATIONS`); adjectives also reach data preparation."""
    for name in names:
        if name in ABLATIONS:
            key, value = ABLATIONS[name]
            group, field = key.split(".")
            c[group][field] = value
            if name == "adjectives":
                c.data.include_adjectives = True
    return c


def runlocal(c: ml_collections.ConfigDict, pipeline: str) -> ml_collections.ConfigDict:
    """A CPU smoke-test size of any config: a built-in tiny pipeline, synthetic data, a few steps."""
    c.model.pretrained = f"builtin:{pipeline}"
    c.model.dtype, c.model.compute_dtype = "float32", ""
    c.data.kind, c.data.path, c.data.prompts = "synthetic", "", DEMO_PROMPTS
    c.data.resolution, c.data.max_nouns = 256, 4
    c.data.latent_channels = 4 if pipeline == "tiny-sd2" else 16
    c.ctcal.map_resolution = 16
    c.optim.accum_steps = 1
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.batch_size, c.total_steps = 8, 4
    c.log_every, c.checkpoint_every, c.sample_every = 1, 2, 4
    return c


def set_ctcal(c: ml_collections.ConfigDict, loss: ctcal.CTCALConfig) -> ml_collections.ConfigDict:
    """`c.ctcal` from a `ctcal.CTCALConfig` (its `num_train_timesteps` is `c.num_train_timesteps`);
    the inverse of `builder.ctcal_config`."""
    for field, value in dataclasses.asdict(loss).items():
        if field == "num_train_timesteps":
            c.num_train_timesteps = value
        else:
            c.ctcal[field] = -1.0 if field == "teacher_t" and value is None else value
    return c
