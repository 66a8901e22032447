"""Text-to-image sampling: a diffusers pipeline folder in, latents and images out, as diffusers'
`StableDiffusionPipeline` / `StableDiffusion3Pipeline` / `FluxPipeline` compute them.

Axes: B prompts, N inference steps, h, w, C latent, H, W image, T text tokens.

`generate` runs one jitted program per pipeline and setting: prompt encoding, the whole denoising
loop as one `lax.scan` (classifier-free guidance, TACA, a per-sample LoRA gate, IterRef and GSN
guidance at their steps), and VAE decoding. Everything that varies between calls without changing
shapes (prompts' tokens, seeds, guidance scale, TACA's γ0 and threshold, IterRef's step index and
learning rate) is an argument of that program, so sweeping over them compiles once.

- Prompts and the empty negative prompt are tokenized and encoded as the pipelines do (`text`).
- CFG: the batch is `[negative, conditional]`, `out = u + g · (c − u)`, only when `g > 1`.
- FLUX.1 (FluxPipeline): `guidance_scale` is the guidance the dev model embeds (an input of every
  forward, no CFG; schnell has none and ignores it); true CFG, as above with `g = true_cfg_scale`,
  only when `true_cfg_scale > 1` and negative prompts are given. The sigmas are FluxPipeline's
  `linspace(1, 1/N, N)`, shifted by `mu` from the image token count (`samplers.calculate_shift`).
  Latents are NHWC `[B, H/8, W/8, 16]`; the transformer packs them 2×2 itself.
- TACA (`taca=TACA(γ0, t_thresh)`, MM-DiT and FLUX): γ(t) per SPEC §4 in every joint attention, on both
  CFG halves (`taca_cond_only=True`: the conditional half only). With a LoRA, the denoiser's
  adapters are gated per sample to be active exactly while TACA is (`lora_with_taca`).
- IterRef (`iterref=IterRef(step=k, lr=...)`): at step k, before the update, Adam on the latent
  through a conditional-only forward with captured maps (SPEC §6), inside the loop (`lax.cond`).
- Latents are carried in float32 between steps whatever the pipeline's dtype (diffusers keeps them
  in the pipeline's dtype; a bf16 pipeline therefore rounds less here).
- Seeds: sample b's initial noise is `normal(fold_in(key(seed_b), 0))` and DDPM's noise at step i
  `normal(fold_in(fold_in(key(seed_b), 1), i))`: a sample does not change with the batch it is in.

`load_pipeline` is the one function here that reads files (through `conversion`); everything else
takes loaded models, so the tests drive it with tiny random pipelines.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ctcal_jax import iterref as iterref_lib
from ctcal_jax import lora as lora_lib
from ctcal_jax import nouns, samplers, text
from ctcal_jax.attention import TACA, AttnCapture
from ctcal_jax.builder import Pipeline
from ctcal_jax.models.vae import unscale_latents

DEFAULT_SCHEDULER = {"sd2": "ddim", "sd3": "flow_euler", "flux": "flow_euler"}
KINDS = {"sd2": ("ddim", "ddpm", "euler"), "sd3": ("flow_euler",), "flux": ("flow_euler",)}
# `generate`'s defaults: steps and guidance scale (FLUX: FluxPipeline's, the embedded guidance).
DEFAULT_STEPS = {"sd2": 50, "sd3": 50, "flux": 28}
DEFAULT_GUIDANCE = {"sd2": 7.5, "sd3": 7.5, "flux": 3.5}


def load_pipeline(path: str | Path, dtype: Any = jnp.float32, *, compute_dtype: Any = None,
                  with_t5: bool = True) -> Pipeline:
    """A diffusers folder (SD 1.x/2.x, SD3/3.5, FLUX.1), a hub id in the local cache, or
    `builtin:tiny-sd2` / `builtin:tiny-sd3` / `builtin:tiny-flux`, with its VAE, ready for `generate`.
    `with_t5=False` leaves SD3's T5 out (its stream is then zeros, as a pipeline saved without T5;
    FLUX.1 cannot sample without it)."""
    from conversion.pipeline import load_folder, resolve  # reads files: see the module docstring

    return load_folder(resolve(str(path)), dtype, compute_dtype=compute_dtype, with_vae=True, with_t5=with_t5)


@dataclasses.dataclass(frozen=True)
class _IterRefStatic:
    """IterRef's settings that shape the program (its step, lr and subjects are arguments)."""

    n_iters: int
    loss: str
    eps: float
    kernel_size: int
    sigma: float
    streams: tuple[tuple[int, int], ...]
    gsn: bool


@dataclasses.dataclass(frozen=True)
class _Static:
    """What one compiled program is specialised to (everything else is an argument)."""

    plan: tuple[Any, ...]
    cfg: bool
    taca: bool
    taca_cond_only: bool
    lora_gated: bool
    iterref: _IterRefStatic | None
    capture: AttnCapture | None
    decode: bool
    trajectory: bool
    attn: bool


# pipeline -> {static -> jitted program}; weak, so dropping a pipeline frees its programs.
_PROGRAMS: weakref.WeakKeyDictionary[Pipeline, dict[_Static, Any]] = weakref.WeakKeyDictionary()


def generate(
    pipe: Pipeline,
    prompts: str | Sequence[str],
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    seed: int | Sequence[int] = 0,
    latents: Any = None,
    negative_prompts: str | Sequence[str] | None = None,
    taca: TACA | None = None,
    iterref: iterref_lib.IterRef | None = None,
    lora: Mapping[str, Any] | str | Path | None = None,
    height: int | None = None,
    width: int | None = None,
    taca_cond_only: bool = False,
    lora_with_taca: bool = True,
    decode: bool = True,
    return_trajectory: bool = False,
    return_attn: bool = False,
    step_noise: Any = None,
    true_cfg_scale: float = 1.0,
) -> dict[str, Any]:
    """Sample `len(prompts)` images (module docstring).

    Args:
      pipe: `load_pipeline(...)` (or any `builder.Pipeline` with a VAE).
      num_inference_steps: default 50 (SD 1.x/2.x, SD3), 28 (FLUX.1, as FluxPipeline).
      guidance_scale: the CFG scale (default 7.5); FLUX.1: the embedded guidance of dev models
        (default 3.5, as FluxPipeline), unused by schnell.
      scheduler: "ddim" | "ddpm" | "euler" (SD 1.x/2.x; default "ddim") or "flow_euler" (SD3,
        FLUX.1); its settings come from `pipe.scheduler` (the folder's `scheduler_config.json`).
      seed: one int (sample b uses `seed + b`) or one per prompt.
      latents: initial latents `[B, h, w, C]` as diffusers' `latents=` (SD: scaled by the
        scheduler's `init_noise_sigma`, as the pipeline does).
      negative_prompts: CFG's negative prompts (default the empty prompt; FLUX.1's true CFG runs
        only when they are given, as FluxPipeline's `negative_prompt`).
      lora: `{component: LoRA tree}` (`lora.init` / `conversion.import_lora`), or a LoRA file or
        folder (diffusers/peft or kohya), applied unmerged.
      height, width: image size (default the denoiser's `sample_size` × the VAE's factor).
      taca_cond_only: TACA on the conditional CFG half only.
      lora_with_taca: with `taca`, the denoiser's LoRA is active exactly while TACA is (SPEC §4);
        False keeps it on at every step.
      decode: decode images with the VAE (False: latents only).
      return_trajectory: also return the latents after every step.
      return_attn: also return the conditional half's image→text maps averaged over all steps.
      step_noise: DDPM's per-step noise `[N, B, h, w, C]` instead of the seeded draws.
      true_cfg_scale: FLUX.1's true CFG scale (FluxPipeline's `true_cfg_scale`): CFG with
        `negative_prompts` when > 1.

    Returns a dict: `latents` `[B, h, w, C]` float32 (diffusers' `output_type="latent"`), `images`
    `[B, H, W, 3]` float32 in [0, 1] (with `decode`), `timesteps` `[N]`, and with the options
    `trajectory` `[N, B, h, w, C]` and `attn` `[B, h', w', T]`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = len(prompts)
    if batch == 0:
        raise ValueError("prompts is empty")
    kind = scheduler or DEFAULT_SCHEDULER[pipe.family]
    if kind not in KINDS[pipe.family]:
        raise ValueError(f"scheduler={kind!r} does not apply to a {pipe.family} pipeline ({pipe.source}); "
                         f"expected one of {KINDS[pipe.family]}")
    if taca is not None and pipe.family == "sd2":
        raise ValueError("taca applies to MM-DiT joint attention (SD3/3.5 and FLUX.1 pipelines), not to a UNet")
    if true_cfg_scale != 1.0 and pipe.family != "flux":
        raise ValueError(f"true_cfg_scale applies to FLUX.1 pipelines; {pipe.source!r} is {pipe.family}: "
                         "use guidance_scale")
    steps = DEFAULT_STEPS[pipe.family] if num_inference_steps is None else num_inference_steps
    guidance_scale = DEFAULT_GUIDANCE[pipe.family] if guidance_scale is None else float(guidance_scale)
    if decode and pipe.vae is None:
        raise ValueError(f"the pipeline from {pipe.source!r} has no VAE: load it with sampling.load_pipeline, "
                         "or pass decode=False")
    h, w = _latent_size(pipe, height, width)
    channels = pipe.denoiser.out_channels
    plan = scheduler_plan(pipe, kind, steps, h, w)
    seeds = _seeds(seed, batch)
    if latents is None:
        x_init = initial_noise(seeds, (h, w, channels))
    else:
        x_init = _check_array("latents", latents, (batch, h, w, channels))
    if step_noise is not None:
        if not plan.stochastic:
            raise ValueError(f"step_noise is only used by the ddpm scheduler, not {kind!r}")
        step_noise = _check_array("step_noise", step_noise, (plan.num_steps, batch, h, w, channels))
    negatives = _negatives(negative_prompts, batch)
    tokens = {c: jnp.asarray(t["input_ids"]) for c, t in text.tokenize_prompts(pipe.encoders, prompts).items()}
    neg_tokens = {c: jnp.asarray(t["input_ids"]) for c, t in text.tokenize_prompts(pipe.encoders, negatives).items()}
    adapters = _loras(pipe, lora)
    ir_static, ir_args = _iterref_inputs(pipe, prompts, iterref, plan.num_steps)
    capture = _capture(pipe, iterref, h) if (iterref is not None or return_attn) else None
    cfg = true_cfg_scale > 1 and negative_prompts is not None if pipe.family == "flux" else guidance_scale > 1
    static = _Static(plan.static(), cfg, taca is not None, taca_cond_only,
                     taca is not None and lora_with_taca and pipe.denoiser_name in adapters, ir_static, capture,
                     decode, return_trajectory, return_attn)
    programs = _PROGRAMS.setdefault(pipe, {})
    if static not in programs:
        programs[static] = _make_program(pipe.family, pipe.denoiser, pipe.encoders, pipe.vae, static)
    dynamic = {
        "guidance": jnp.float32(true_cfg_scale if pipe.family == "flux" else guidance_scale),  # CFG's
        "embedded_guidance": jnp.float32(guidance_scale),  # FLUX.1-dev's model input
        "taca": jnp.asarray([taca.gamma, taca.t_threshold] if taca else [1.0, 0.0], jnp.float32),
        "timesteps": jnp.asarray(plan.timesteps),
        "tables": {k: jnp.asarray(v) for k, v in plan.tables.items()},
        "init_sigma": jnp.float32(plan.init_noise_sigma),
        "seeds": jnp.asarray(seeds, jnp.uint32),
        "iterref": ir_args,
    }
    out = programs[static](pipe.params, adapters, tokens, neg_tokens, x_init, step_noise, dynamic)
    out["timesteps"] = plan.timesteps
    return out


def scheduler_plan(pipe: Pipeline, kind: str, num_inference_steps: int, h: int, w: int) -> samplers.Plan:
    """The scheduler plan `generate` runs for `h × w` latents, with the pipeline's own `set_timesteps`
    arguments: SD3's `mu` from the image token count (dynamic-shift configs); FLUX.1's sigmas
    `linspace(1, 1/N, N)` and `mu` with FluxPipeline's `calculate_shift` defaults."""
    seq = (h // pipe.denoiser.patch_size) * (w // pipe.denoiser.patch_size) if pipe.family != "sd2" else None
    if pipe.family == "flux":
        return samplers.plan(kind, pipe.scheduler, num_inference_steps,
                             sigmas=samplers.flux_sigmas(num_inference_steps),
                             mu=samplers.calculate_shift(pipe.scheduler, seq, default_max_shift=1.15))
    return samplers.plan(kind, pipe.scheduler, num_inference_steps, image_seq_len=seq)


def _latent_size(pipe: Pipeline, height: int | None, width: int | None) -> tuple[int, int]:
    factor = 2 ** (len(pipe.vae.block_out_channels) - 1) if pipe.vae is not None else 8
    default = None if pipe.latent_size is None else pipe.latent_size * factor
    # FLUX packs 2×2 latent pixels into a token: its sizes are multiples of twice the VAE's factor.
    multiple = factor * (pipe.denoiser.patch_size if pipe.family == "flux" else 1)
    sizes = []
    for name, value in (("height", height), ("width", width)):
        value = default if value is None else value
        if value is None:
            raise ValueError(f"{name} is needed: the pipeline from {pipe.source!r} has no sample_size")
        if value <= 0 or value % multiple:
            what = f"the VAE's factor {factor}" + (f" × the {pipe.denoiser.patch_size}×{pipe.denoiser.patch_size} "
                                                    "packing" if multiple != factor else "")
            raise ValueError(f"{name}={value}: expected a positive multiple of {what}")
        sizes.append(value // factor)
    return sizes[0], sizes[1]


def _seeds(seed: int | Sequence[int], batch: int) -> np.ndarray:
    if isinstance(seed, (int, np.integer)):
        return (np.int64(seed) + np.arange(batch)).astype(np.uint32)
    seeds = np.asarray(list(seed), np.int64)
    if seeds.shape != (batch,):
        raise ValueError(f"seed: expected one int or {batch} (one per prompt), got {seeds.shape[0]}")
    return seeds.astype(np.uint32)


def initial_noise(seeds: Any, shape: tuple[int, ...]) -> jax.Array:
    """Sample b's initial noise `normal(fold_in(key(seeds[b]), 0), shape)`: `[B, *shape]` float32."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)


def _negatives(negative_prompts: str | Sequence[str] | None, batch: int) -> list[str]:
    if negative_prompts is None:
        return [""] * batch
    negatives = [negative_prompts] * batch if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negatives) != batch:
        raise ValueError(f"negative_prompts: expected {batch} (one per prompt), got {len(negatives)}")
    return negatives


def _check_array(name: str, value: Any, shape: tuple[int, ...]) -> jax.Array:
    value = jnp.asarray(value, jnp.float32)
    if value.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} (NHWC latents), got {value.shape}")
    return value


def _loras(pipe: Pipeline, lora: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """`lora` as `{component: tree}`, every adapter checked against the pipeline's params."""
    if lora is None:
        return {}
    if isinstance(lora, (str, Path)):
        from conversion import import_lora  # reads files: see the module docstring

        lora = import_lora(lora, params=pipe.params)
    out = {}
    for component, tree in lora.items():
        if component not in pipe.params or component == "vae":
            raise ValueError(f"lora has adapters for {component!r}, which the pipeline from {pipe.source!r} "
                             f"does not have (it has {sorted(c for c in pipe.params if c != 'vae')})")
        lora_lib.check(pipe.params[component], tree, what=f"the LoRA for {component}")
        out[component] = tree
    return out


def _capture(pipe: Pipeline, iterref: iterref_lib.IterRef | None, h: int) -> AttnCapture:
    if pipe.family != "sd2":
        return AttnCapture(blocks=None)
    if iterref is not None and iterref.resolution:
        return AttnCapture(resolutions=(iterref.resolution,))
    return AttnCapture(resolutions=(coarsest_attention(pipe, h),))


def coarsest_attention(pipe: Pipeline, h: int) -> int:
    """The side of the UNet's coarsest down level with cross-attention at latent side `h`: 16 at SD
    1.x/2.x's 64×64 latents (`down_blocks.2`, `up_blocks.1`, SPEC §6), 8 for shapes-sd2's 16×16."""
    levels = sum(kind.startswith("CrossAttn") for kind in pipe.denoiser.down_block_types)
    return max(h // 2 ** max(levels - 1, 0), 1)


def _streams(pipe: Pipeline) -> list[tuple[str, int]]:
    """`(tokenizer component, tokens)` of each text stream on the denoiser's token axis, in order."""
    lengths = pipe.encoders.max_lengths
    if pipe.family == "sd2":
        return [("text_encoder", lengths["text_encoder"])]
    if pipe.family == "flux":  # T5 only: CLIP-L gives the pooled vector
        return [("text_encoder_2", lengths["text_encoder_2"])]
    streams = [("text_encoder", lengths["text_encoder"])]
    if "text_encoder_3" in pipe.encoders.tokenizers:
        streams.append(("text_encoder_3", lengths["text_encoder_3"]))
    return streams


def stream_spans(pipe: Pipeline) -> list[tuple[int, int]]:
    """`[start, end)` of each text stream on the denoiser's token axis: SD 1.x/2.x `[(0, 77)]`, SD3
    `[(0, 77), (77, 333)]` (CLIP, then T5; CLIP alone when the pipeline has no T5), FLUX.1 `[(0, 512)]`."""
    spans, start = [], 0
    for _, length in _streams(pipe):
        spans.append((start, start + length))
        start += length
    return spans


def compiled_programs(pipe: Pipeline) -> int:
    """How many sampling executables `generate` has compiled for `pipe` so far: settings that are
    arguments of the program (seeds, guidance, TACA's values, IterRef's step and lr) add none."""
    return sum(f._cache_size() for f in _PROGRAMS.get(pipe, {}).values())  # jax.jit's executable cache


def subject_weights(pipe: Pipeline, prompts: Sequence[str], subjects: Sequence[Sequence[Any]] | None = None,
                    tagger: Any = "stanza") -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's subjects on the denoiser's whole token axis: `([B, G, T] sub-token-mean weights,
    [B, T] real-token mask)`, from `subjects` (words or spans per prompt) or the tagger. G is the
    most subjects of any prompt rounded up to a multiple of 4; rows past a prompt's own are zero."""
    if subjects is not None and len(subjects) != len(prompts):
        raise ValueError(f"iterref subjects: expected one list per prompt ({len(prompts)}), got {len(subjects)}")
    per_stream = []
    for component, length in _streams(pipe):
        tok = pipe.encoders.tokenizers[component]
        groups = [nouns.noun_token_groups(p, tok, tagger, given=None if subjects is None else subjects[b],
                                          max_length=length) for b, p in enumerate(prompts)]
        masks = np.stack([nouns.real_token_mask(p, tok, length) for p in prompts])
        per_stream.append((groups, masks, length))
    # Subjects padded to a multiple of 4 (zero rows are ignored): batches with 1-4 subjects share a
    # shape, so a sweep over several batches compiles once.
    g = -(-max(1, max(len(gr) for groups, _, _ in per_stream for gr in groups)) // 4) * 4
    weights = np.concatenate([np.stack([nouns.group_weights(gr, g, length) for gr in groups])
                              for groups, _, length in per_stream], axis=-1)
    masks = np.concatenate([m for _, m, _ in per_stream], axis=-1)
    lengths = pipe.encoders.max_lengths
    total = lengths["text_encoder_2"] if pipe.family == "flux" else lengths["text_encoder"] + (
        lengths.get("text_encoder_3", 0) if pipe.family == "sd3" else 0)
    pad = total - weights.shape[-1]  # SD3 without T5: the zero T5 stream takes no part
    return (np.pad(weights, ((0, 0), (0, 0), (0, pad))), np.pad(masks, ((0, 0), (0, pad))))


def map_kernel(pipe: Pipeline) -> int:
    """The smoothing kernel of processed maps (SPEC §2): 3 on the UNet's 16×16 maps, 5 on the 64×64
    maps of the joint-attention transformers (SD3, FLUX.1) at 1024 px."""
    return 3 if pipe.family == "sd2" else 5


def _iterref_inputs(pipe: Pipeline, prompts: Sequence[str], ir: iterref_lib.IterRef | None, n_steps: int
                    ) -> tuple[_IterRefStatic | None, dict[str, jax.Array]]:
    if ir is None:
        return None, {}
    if not 0 <= ir.step < n_steps:
        raise ValueError(f"IterRef(step={ir.step}): expected a step index in 0..{n_steps - 1}")
    weights, mask = subject_weights(pipe, prompts, ir.subjects, ir.tagger)
    kernel = ir.kernel_size or map_kernel(pipe)
    spans = stream_spans(pipe)
    gsn = ir.gsn_steps or (0, 0)
    static = _IterRefStatic(ir.n_iters, ir.loss, ir.eps, kernel, ir.sigma, tuple(spans), ir.gsn_steps is not None)
    args = {"step": jnp.int32(ir.step), "lr": jnp.float32(ir.lr), "weights": jnp.asarray(weights),
            "mask": jnp.asarray(mask), "gsn": jnp.asarray(gsn, jnp.int32), "gsn_lr": jnp.float32(ir.gsn_lr)}
    return static, args


def _make_program(family: str, denoiser: Any, encoders: text.PromptEncoders, vae: Any, s: _Static) -> Any:
    """The jitted sampling program for one setting (closes over modules only, never the pipeline)."""
    p = samplers.Plan(*s.plan[:2], np.zeros(0, np.float32), 1.0, {}, *s.plan[2:])
    name = "unet" if family == "sd2" else "transformer"
    embeds_guidance = family == "flux" and denoiser.guidance_embeds

    def denoise(params, adapters, x, t, cond, taca, gate, capture):
        variables = {"params": params[name]}
        if name in adapters:
            variables["lora"] = adapters[name] if gate is None else lora_lib.gated(adapters[name], gate)
        tb = jnp.full((x.shape[0],), t, jnp.float32)
        if family == "sd2":
            return denoiser.apply(variables, x, tb, cond["prompt_embeds"], capture=capture)
        if family == "flux":
            return denoiser.apply(variables, x, tb, cond["prompt_embeds"], cond["pooled_prompt_embeds"],
                                  guidance=cond.get("guidance"), capture=capture, taca=taca)
        return denoiser.apply(variables, x, tb, cond["prompt_embeds"], cond["pooled_prompt_embeds"],
                              capture=capture, taca=taca)

    def run(params, adapters, tokens, neg_tokens, x_init, step_noise, d):
        text_lora = {c: t for c, t in adapters.items() if c != name} or None
        batch = d["seeds"].shape[0]

        def encode(ids):
            """The denoiser's conditioning: text embeddings, and FLUX.1-dev's guidance per row."""
            embeds = text.encode_prompts(encoders, params, ids, lora=text_lora)
            if embeds_guidance:
                embeds["guidance"] = jnp.full((batch,), d["embedded_guidance"])
            return embeds

        cond = encode(tokens)
        keys = jax.vmap(jax.random.key)(d["seeds"])
        x = x_init * d["init_sigma"]
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), encode(neg_tokens), cond) if s.cfg else cond
        gamma0, threshold = d["taca"][0], d["taca"][1]
        rows = 2 * batch if s.cfg else batch
        is_cond = jnp.arange(rows) >= (rows - batch)

        def conditioning(t, cond_rows):
            """TACA and the LoRA gate for a batch whose rows `cond_rows` are conditional."""
            if not s.taca:
                return None, None
            rows = cond_rows if s.taca_cond_only else jnp.ones_like(cond_rows)
            gamma = jnp.where(rows, gamma0, 1.0)
            gate = (rows & (t >= threshold)).astype(jnp.float32) if s.lora_gated else None
            return TACA(gamma=gamma, t_threshold=threshold), gate

        def cond_forward(z, t, tab):
            """The conditional-only forward with captured maps (IterRef)."""
            taca, gate = conditioning(t, jnp.ones(batch, bool))
            return denoise(params, adapters, samplers.scale_model_input(p, z, tab), t, cond, taca, gate, s.capture)

        def subject_objective(z, t, tab):
            c = s.iterref
            _, aux = cond_forward(z, t, tab)
            return iterref_lib.batch_loss(aux["attn"], d["iterref"]["weights"], d["iterref"]["mask"], loss=c.loss,
                                          kernel_size=c.kernel_size, sigma=c.sigma, streams=c.streams)

        def refine(z, t, tab):
            c, ir = s.iterref, d["iterref"]
            return iterref_lib.refine(lambda zz, tt: cond_forward(zz, tt, tab), z, t, ir["weights"],
                                      n_iters=c.n_iters, lr=ir["lr"], loss=c.loss, eps=c.eps, token_mask=ir["mask"],
                                      kernel_size=c.kernel_size, sigma=c.sigma, streams=c.streams)

        def body(carry, xs):
            x, attn_sum = carry
            i, t, tab, noise = xs
            if s.iterref is not None:
                ir = d["iterref"]
                x = jax.lax.cond(i == ir["step"], lambda z: refine(z, t, tab), lambda z: z, x)
                if s.iterref.gsn:
                    in_range = (i >= ir["gsn"][0]) & (i < ir["gsn"][1])
                    x = jax.lax.cond(in_range, lambda z: z - ir["gsn_lr"] * jax.grad(subject_objective)(z, t, tab),
                                     lambda z: z, x)
            x_in = samplers.scale_model_input(p, x, tab)
            model_in = jnp.concatenate([x_in, x_in]) if s.cfg else x_in
            taca, gate = conditioning(t, is_cond)
            pred, aux = denoise(params, adapters, model_in, t, both, taca, gate, s.capture if s.attn else None)
            if s.cfg:
                uncond, cond_pred = jnp.split(pred, 2)
                pred = uncond + d["guidance"] * (cond_pred - uncond)
            x = samplers.update(p, x, pred, tab, noise).astype(jnp.float32)  # latents stay float32
            if s.attn:
                attn_sum = attn_sum + aux["attn"][rows - batch:].astype(jnp.float32)
            return (x, attn_sum), (x if s.trajectory else None)

        n = d["timesteps"].shape[0]
        if p.stochastic:
            if step_noise is None:
                step_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(k, 1), i))(
                    jnp.arange(n)))(keys)  # [B, N]
                noise = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, x.shape[1:])))(step_keys).swapaxes(0, 1)
            else:
                noise = step_noise
        else:
            noise = None
        attn0 = None
        if s.attn:
            shape = jax.eval_shape(lambda z: denoise(params, adapters, z, d["timesteps"][0], cond, None, None,
                                                     s.capture)[1]["attn"], x)
            attn0 = jnp.zeros(shape.shape, jnp.float32)
        xs = (jnp.arange(n), d["timesteps"], d["tables"], noise)
        (x, attn_sum), trajectory = jax.lax.scan(body, (x, attn0), xs)
        out = {"latents": x.astype(jnp.float32)}
        if s.trajectory:
            out["trajectory"] = trajectory.astype(jnp.float32)
        if s.attn:
            out["attn"] = attn_sum / n
        if s.decode:
            images = vae.apply({"params": params["vae"]}, unscale_latents(x, vae), method="decode")
            out["images"] = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return out

    return jax.jit(run)
