"""One builder: a training config and a pipeline's models -> the jitted step, its state and shardings.

`build(config, pipeline)` is the only place the step is wired (trainable adapters, optimizer groups,
objective, mesh, shardings). The trainer (`python -m ctcal_jax.train`), the demo, the tests, the
benchmarks and the compile check all call it. It knows nothing of files: `pipeline` is the loaded
models (`conversion.pipeline.load`), or their abstract shapes (`conversion.pipeline.abstract`, for
compile checks on a host without the weights), or tiny random models in tests.

Config keys read here (`ctcal_jax.config.base_config` documents all of them): `objective`,
`ctcal.*`, `taca.*`, `lora.*`, `optim.*`, `mesh.*`, `sharding.*`, `model.remat`, `flow.*`, `seed`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh

from ctcal_jax import config as config_lib
from ctcal_jax import ctcal, lora, schedules, text
from ctcal_jax.attention import TACA
from ctcal_jax.families import flux as flux_family
from ctcal_jax.families import mmdit as mmdit_family
from ctcal_jax.families import unet as unet_family
from ctcal_jax.optim import adamw_groups
from ctcal_jax.sharding import make_mesh, param_shardings
from ctcal_jax.train_step import Family, State, init_state, make_step_fn, make_train_step, place

DENOISER = {"sd2": "unet", "sd3": "transformer", "flux": "transformer"}


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """A diffusers pipeline's trainable-side models.

    Attributes:
      family: "sd2" (SD 1.x/2.x: UNet, one CLIP), "sd3" (SD3/3.5: MM-DiT, CLIP-L, CLIP-G, T5) or
        "flux" (FLUX.1: `FluxTransformer2DModel`, CLIP-L, T5; the diffusion and TACA objectives).
      denoiser: the UNet, MM-DiT or FLUX Flax module.
      encoders: the text side (tokenizers, text modules, lengths).
      params: frozen params by component (`unet` | `transformer`, `text_encoder`, ..., optionally
        `vae`): arrays (on a mesh or not) or `jax.ShapeDtypeStruct`s.
      scheduler: the folder's `scheduler/scheduler_config.json` (betas, prediction type, shift).
      vae: the VAE module when batches carry images (its params under `params["vae"]`).
      source: where the models came from (a folder), for messages and logs.
      latent_size: the denoiser's `sample_size` (latent side of its default resolution), when known.
    """

    family: Literal["sd2", "sd3", "flux"]
    denoiser: nn.Module
    encoders: text.PromptEncoders
    params: dict[str, Any]
    scheduler: dict[str, Any]
    vae: nn.Module | None = None
    source: str = ""
    latent_size: int | None = None

    @property
    def denoiser_name(self) -> str:
        return DENOISER[self.family]


@dataclasses.dataclass(eq=False)
class Run:
    """What `build` returns.

    Attributes:
      step: `train_step(state, batch, rng) -> (state, metrics)`: jitted with shardings, the state
        donated (the state passed in is deleted; keep using the returned one). `step.jitted` lowers.
      state: the initial train state, placed with `state_shardings` (abstract with an abstract pipeline).
      family: the objective's `train_step.Family`.
      optimizer, mesh, frozen_shardings, state_shardings: as used by `step`.
      frozen: the frozen params as the step holds them (placed).
    """

    step: Callable[..., Any]
    state: State
    family: Family
    optimizer: optax.GradientTransformation
    mesh: Mesh
    frozen: Any
    frozen_shardings: Any
    state_shardings: Any


def mesh_from_config(config: ml_collections.ConfigDict, devices: Any = None) -> Mesh:
    """The (`data`, `fsdp`) mesh of `config.mesh` over all devices (or `devices`)."""
    return make_mesh(config.mesh.data, config.mesh.fsdp, devices)


def ctcal_config(config: ml_collections.ConfigDict) -> ctcal.CTCALConfig:
    """`config.ctcal` as the loss's (hashable) configuration."""
    c = config.ctcal
    return ctcal.CTCALConfig(
        lambdas=tuple(float(x) for x in c.lambdas), tau=c.tau, kernel_size=c.kernel_size, sigma=c.sigma,
        reweight_scale=c.reweight_scale, tokens=c.tokens, semantic=c.semantic, regularizer=c.regularizer,
        adaptive_weight=c.adaptive_weight, adjectives=c.adjectives, teacher=c.teacher,
        teacher_t=None if c.teacher_t is None or c.teacher_t < 0 else float(c.teacher_t),
        num_train_timesteps=int(config.num_train_timesteps),
    )


def trained_text_encoders(config: ml_collections.ConfigDict, pipeline: Pipeline) -> tuple[str, ...]:
    """The CLIP encoders that get a LoRA: `config.lora.text_targets` empty trains none; T5 never (SPEC §3)."""
    if not config.lora.text_targets or config.objective == "taca":
        return ()
    t5 = text.T5_COMPONENT.get(pipeline.encoders.family)
    return tuple(c for c in pipeline.encoders.models if c != t5)


def init_trainable(config: ml_collections.ConfigDict, pipeline: Pipeline, rng: jax.Array) -> dict[str, Any]:
    """The trainable tree: `{denoiser: LoRA, <text encoder>: LoRA, ..., "ae": map autoencoder}` (the
    autoencoder only for CTCAL with the semantic terms). Works on abstract params too."""
    texts = trained_text_encoders(config, pipeline)
    keys = jax.random.split(rng, 2 + len(texts))
    name = pipeline.denoiser_name
    trainable = {name: lora.init(keys[0], pipeline.params[name], targets=config.lora.targets,
                                 rank=config.lora.rank, alpha=config.lora.alpha)}
    for key, c in zip(keys[2:], texts):
        trainable[c] = lora.init(key, pipeline.params[c], targets=config.lora.text_targets,
                                 rank=config.lora.rank, alpha=config.lora.alpha)
    if config.objective == "ctcal" and config.ctcal.semantic:
        trainable["ae"] = ctcal.init_autoencoder(keys[1], config.ctcal.map_resolution)
    return trainable


def make_optimizer(config: ml_collections.ConfigDict, trainable: Any) -> optax.GradientTransformation:
    """AdamW per regex group (`config.optim.groups`: `(pattern, lr, weight decay)`, first match wins,
    an unmatched leaf is an error), optional global-norm clipping first."""
    o = config.optim
    groups = [(str(p), float(lr), float(wd)) for p, lr, wd in o.groups]
    adamw = adamw_groups(trainable, groups, b1=o.b1, b2=o.b2, eps=o.eps, warmup_steps=o.warmup_steps)
    return optax.chain(optax.clip_by_global_norm(o.max_grad_norm), adamw) if o.max_grad_norm else adamw


def make_family(config: ml_collections.ConfigDict, pipeline: Pipeline) -> Family:
    """The objective of `config.objective` for the pipeline's model family."""
    remat = config.model.remat
    loss = ctcal_config(config) if config.objective == "ctcal" else None
    if pipeline.family == "sd2":
        sched = schedules.ddpm_from_config(pipeline.scheduler)
        return unet_family.make_family(
            pipeline.denoiser, pipeline.encoders, loss, schedule=sched,
            prediction_type=pipeline.scheduler.get("prediction_type", "epsilon"),
            resolution=config.ctcal.map_resolution, remat=remat, objective=config.objective, vae=pipeline.vae)
    taca = TACA(config.taca.gamma, config.taca.t_threshold)
    if pipeline.family == "flux":
        return flux_family.make_family(
            pipeline.denoiser, pipeline.encoders, num_train_timesteps=config.num_train_timesteps,
            shift=flux_family.training_shift(pipeline.scheduler), guidance=config.flow.guidance, remat=remat,
            objective=config.objective, taca=taca, vae=pipeline.vae)
    blocks = config.ctcal.capture_blocks
    return mmdit_family.make_family(
        pipeline.denoiser, pipeline.encoders, loss, shift=float(pipeline.scheduler.get("shift", 3.0)),
        logit_mean=config.flow.logit_mean, logit_std=config.flow.logit_std,
        capture_blocks=None if blocks is None else tuple(blocks), remat=remat, objective=config.objective,
        taca=taca, vae=pipeline.vae)


def build(
    config: ml_collections.ConfigDict,
    pipeline: Pipeline,
    *,
    mesh: Mesh | None = None,
    trainable: Any = None,
) -> Run:
    """The step of `config` on `pipeline` (module docstring).

    Args:
      mesh: default `mesh_from_config(config)`; the frozen params are placed on it by
        `config.sharding.frozen` (already-placed arrays with those shardings are not copied).
      trainable: the initial trainable tree; default `init_trainable(config, pipeline, key(seed))`.
        With an abstract pipeline the state is abstract too (`jax.ShapeDtypeStruct`s).
    """
    config_lib.check(config)
    mesh = mesh or mesh_from_config(config)
    frozen = dict(pipeline.params)
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen))
    if trainable is None:
        key = jax.random.key(config.seed)
        make = lambda: init_trainable(config, pipeline, key)  # noqa: E731
        trainable = jax.eval_shape(make) if abstract else make()
    optimizer = make_optimizer(config, trainable)
    family = make_family(config, pipeline)
    state = (jax.eval_shape(lambda t: init_state(t, optimizer), trainable) if abstract
             else init_state(trainable, optimizer))
    frozen_sh = param_shardings(frozen, _rules(config.sharding.frozen), mesh)
    state_sh = param_shardings(state, _rules(config.sharding.state), mesh)
    if not abstract:
        frozen, state = place(frozen, frozen_sh), place(state, state_sh)
    step = make_train_step(family, optimizer, frozen, mesh=mesh, frozen_shardings=frozen_sh,
                           state_shardings=state_sh, accum_steps=config.optim.accum_steps)
    return Run(step=step, state=state, family=family, optimizer=optimizer, mesh=mesh, frozen=frozen,
               frozen_shardings=frozen_sh, state_shardings=state_sh)


def step_fn(config: ml_collections.ConfigDict, pipeline: Pipeline, trainable: Any):
    """The un-jitted `(frozen, state, batch, rng) -> (state, metrics)` of `config` (cost analyses, tests)."""
    return make_step_fn(make_family(config, pipeline), make_optimizer(config, trainable), config.optim.accum_steps)


def _rules(rules: Any) -> list[tuple[str, tuple[str | None, ...]]]:
    return [(str(pattern), tuple(axes)) for pattern, axes in rules]


def global_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """`config.batch_size`, checked against the mesh and gradient accumulation."""
    b, devices, accum = config.batch_size, mesh.devices.size, config.optim.accum_steps
    if b % (devices * accum):
        raise ValueError(f"batch_size={b} must be divisible by the {devices} devices × accum_steps={accum}")
    return b


def abstract_batch(config: ml_collections.ConfigDict, pipeline: Pipeline, batch_size: int | None = None) -> dict:
    """Shapes and dtypes of a training batch for `pipeline` (compile checks): images when the
    pipeline carries its VAE (image data), else prepared latents; token ids, the CTCAL token arrays
    of each stream, and SD3's or FLUX.1's precomputed T5 stream."""
    b = batch_size or config.batch_size
    r = config.data.resolution
    f32, i32 = jnp.float32, jnp.int32
    n = config.data.max_nouns
    spec = jax.ShapeDtypeStruct
    latent_c = pipeline.denoiser.out_channels  # latent channels in = out for SD/SD3/FLUX.1
    t5 = text.T5_COMPONENT.get(pipeline.encoders.family)
    if pipeline.vae is not None:
        pixels = {"images": spec((b, r, r, 3), f32)}
    else:
        pixels = {"latents": spec((b, r // 8, r // 8, latent_c), f32)}
    batch: dict[str, Any] = {**pixels, "input_ids": {c: spec((b, pipeline.encoders.max_lengths[c]), i32)
                                                     for c in pipeline.encoders.models if c != t5}}
    if pipeline.family == "sd2":
        batch.update(noun_weights=spec((b, n, 77), f32), token_mask=spec((b, 77), bool))
        return batch
    if pipeline.family == "sd3":
        batch.update(noun_weights_clip=spec((b, n, 77), f32), token_mask_clip=spec((b, 77), bool))
    length = pipeline.encoders.max_lengths[t5]
    batch.update(noun_weights_t5=spec((b, n, length), f32), token_mask_t5=spec((b, length), bool),
                 t5_embeds=spec((b, length, pipeline.denoiser.joint_attention_dim), f32))
    return batch
