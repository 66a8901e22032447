"""The CTCAL train step: one pure, jitted, sharded `train_step(state, batch, rng) -> (state, metrics)`.

Pytrees (all plain dicts):
- `frozen`: the pretrained weights, e.g. `{"unet": ..., "text_encoder": ...}`; an explicit jit
  argument with its own shardings (bound by `make_train_step`), never a captured constant.
- `state`: `{"step": int32 [], "params": trainable, "opt_state": optax state}` where `trainable` is
  `{"<component>": LoRA tree, ..., "ae": map-autoencoder params}`; kept in float32.
- `batch`: `[B, ...]` arrays, split over the mesh's (`data`, `fsdp`) axes. The model family
  (`ctcal_jax/families/`) says which keys it reads; every family reads the CTCAL token arrays
  `noun_weights` `[B, N, T]` and `token_mask` `[B, T]` per text stream, and an optional `reward`
  `[B]` (GORS weighting).

A family supplies `forward(frozen, trainable, batch, rng) -> dict` with the prediction and target
and, for the CTCAL objective, the student and teacher maps and the timesteps; it runs the teacher
under `stop_gradient`, so the teacher costs a forward pass and keeps no activations for the backward
pass. The objective is the family's (`families/`): CTCAL, diffusion-only (GORS when the data carries
rewards) or TACA's LoRA loss are configurations of this one step. This file adds what is common: the
losses (SPEC §3), gradient accumulation, the optimizer update and the jit with shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ctcal_jax import checks, ctcal
from ctcal_jax.sharding import batch_sharding, replicated

State = dict[str, Any]
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family contributes to the step.

    Attributes:
      forward: `(frozen, trainable, batch, rng) -> {"pred", "target"}`, plus `"student_maps",
        "teacher_maps", "t_stu", "t_tea"` with CTCAL; maps `[B, h, w, T_total]` as the denoiser's
        `aux["attn"]`.
      streams: text streams of the maps: name -> (token slice on the last map axis, batch key of
        its noun weights, batch key of its token mask). SD 1.x/2.x has one, SD3 two (CLIP, T5);
        the CTCAL loss is averaged over streams. Empty without CTCAL.
      ctcal: the CTCAL loss configuration (weights, smoothing, ablations); None for an objective
        without it (the diffusion loss alone).
      text_inputs: the text encoders whose `input_ids` the batch carries (checked while tracing).
    """

    forward: Callable[..., dict[str, jax.Array]]
    streams: Mapping[str, tuple[slice, str, str]]
    ctcal: ctcal.CTCALConfig | None
    text_inputs: tuple[str, ...] = ()


def loss_fn(family: Family, trainable: Any, frozen: Any, batch: Batch, rng: jax.Array):
    """`L = mean_b w_gors · L_diffusion + mean_b λ_t · L_CTCAL` (SPEC §3) and its metrics; with
    several text streams the CTCAL part is their mean (metrics prefixed `<stream>/`)."""
    out = family.forward(frozen, trainable, batch, rng)
    err = (out["pred"].astype(jnp.float32) - out["target"].astype(jnp.float32)) ** 2
    diffusion = err.reshape(err.shape[0], -1).mean(axis=1)  # [B]
    loss = ctcal.gors_weighted_mean(diffusion, batch.get("reward"))
    metrics = {"diffusion": diffusion.mean()}
    for name, (tokens, weights_key, mask_key) in family.streams.items():
        part, m = ctcal.ctcal_loss(
            out["student_maps"][..., tokens], out["teacher_maps"][..., tokens], batch[weights_key],
            batch[mask_key], trainable.get("ae"), out["t_stu"], family.ctcal, t_tea=out["t_tea"],
        )
        loss = loss + part / len(family.streams)
        prefix = "" if len(family.streams) == 1 else f"{name}/"
        metrics.update({prefix + k: v for k, v in m.items()})
    metrics["loss"] = loss
    return loss, metrics


def _split_micro(batch: Batch, accum_steps: int) -> Batch:
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}")
        # [B] -> [B / accum, accum]: micro-batch i takes every accum-th sample, so each device keeps
        # an equal share of every micro-batch under the batch sharding.
        return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])

    return jax.tree.map(split, batch)


def make_step_fn(family: Family, optimizer: optax.GradientTransformation, accum_steps: int = 1):
    """The un-jitted step `(frozen, state, batch, rng) -> (state, metrics)`."""
    grad_fn = jax.value_and_grad(lambda p, f, b, r: loss_fn(family, p, f, b, r), has_aux=True)

    def step(frozen, state: State, batch: Batch, rng: jax.Array):
        checks.train_batch(batch, text_inputs=family.text_inputs, streams=family.streams)
        params = state["params"]
        rng = jax.random.fold_in(rng, state["step"])
        micro = _split_micro(batch, accum_steps)

        def grads_of(i):
            mb = jax.tree.map(lambda x: x[:, i], micro)
            (_, metrics), grads = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
            return grads, metrics

        def body(total, i):
            return jax.tree.map(jnp.add, total, grads_of(i)), None

        # Micro-batches run one after another; only the running gradient sum stays in memory.
        total, _ = jax.lax.scan(body, grads_of(0), jnp.arange(1, accum_steps))
        grads, metrics = jax.tree.map(lambda x: x / accum_steps, total)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        return new_state, metrics

    return step


def init_state(params: Any, optimizer: optax.GradientTransformation) -> State:
    """A fresh train state for the trainable tree `params`.

    The state holds copies: the train step donates its state (its buffers are reused for the next
    one), and the arrays the caller passed in stay usable.
    """
    params = jax.tree.map(jnp.copy, params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def make_train_step(
    family: Family,
    optimizer: optax.GradientTransformation,
    frozen: Any,
    *,
    mesh: Mesh,
    frozen_shardings: Any,
    state_shardings: Any,
    accum_steps: int = 1,
) -> Callable[[State, Batch, jax.Array], tuple[State, dict[str, jax.Array]]]:
    """`train_step(state, batch, rng) -> (state, metrics)`, jitted once with explicit shardings.

    The frozen weights are bound as the jitted function's first argument, so they are device
    buffers with declared shardings, not constants folded into the program. The state is donated.
    """
    jitted = jax.jit(
        make_step_fn(family, optimizer, accum_steps),
        in_shardings=(frozen_shardings, state_shardings, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(1,),
        # Frozen weights the step does not read (a VAE's decoder, kept for sampling) are on the
        # devices either way: as arguments, the compiled memory analysis counts what the devices hold.
        keep_unused=True,
    )

    def train_step(state: State, batch: Batch, rng: jax.Array):
        return jitted(frozen, state, batch, rng)

    train_step.jitted = jitted  # for lowering / compile checks
    return train_step


def place(tree: Any, shardings: Any) -> Any:
    """Put a host pytree on the mesh with the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


