"""FLUX.1 for the train step: CLIP-L (pooled; LoRA optional), frozen T5, the FLUX transformer (LoRA),
flow matching as diffusers' `train_dreambooth_lora_flux.py` trains it.

Batch keys: `latents` `[B, h, w, 16]` (`(z − shift) · scale`; the transformer packs them 2×2),
`input_ids` `{"text_encoder": [B, 77], "text_encoder_2": [B, 512]}` int32, `t5_embeds` `[B, 512, 4096]`
(precomputed by `prepare`: T5 stays frozen; when absent, T5 runs, frozen, inside the step), optional
`reward` `[B]`; `images` may replace `latents` (`families.common`). Frozen: `{"transformer",
"text_encoder", "text_encoder_2"}`. Trainable: `{"transformer": LoRA, "text_encoder": LoRA (optional)}`.

As diffusers' FLUX script: the training sigmas are the scheduler's unshifted ones (FLUX's scheduler
shifts only at sampling, `use_dynamic_shifting`; a static `shift` is applied when the scheduler has
one), timesteps are drawn uniformly from them (its default `weighting_scheme="none"`), the target is
the velocity `ε − x0`, and FLUX.1-dev's embedded guidance is a constant input (`guidance`, its
`--guidance_scale` default 3.5).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ctcal_jax import schedules, text
from ctcal_jax.attention import TACA
from ctcal_jax.families.common import Objective, check_objective, encode, latents, variables, with_remat
from ctcal_jax.models import remat as remat_lib
from ctcal_jax.train_step import Family


def training_shift(scheduler: dict[str, Any]) -> float:
    """The shift of the training sigmas: 1 when the scheduler shifts dynamically at sampling (FLUX.1,
    `FlowMatchEulerDiscreteScheduler.__init__` leaves its sigmas unshifted then), else its `shift`."""
    return 1.0 if scheduler.get("use_dynamic_shifting") else float(scheduler.get("shift", 1.0))


def make_family(
    transformer: nn.Module,
    encoders: text.PromptEncoders,
    *,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    guidance: float = 3.5,
    remat: remat_lib.Remat = "none",
    objective: Objective = "taca",
    taca: TACA | None = None,
    vae: nn.Module | None = None,
) -> Family:
    """The FLUX.1 `Family`.

    Args:
      shift: of the training sigmas (`training_shift` of the pipeline's scheduler).
      guidance: FLUX.1-dev's embedded guidance scale during training; unused by a transformer without
        a guidance embedding (schnell).
      remat: what each block of the transformer and the text encoders keeps for the backward pass.
      objective: "diffusion" (the flow-matching loss, reward-weighted when the batch has `reward`) or
        "taca" (SPEC §4: the same loss with `taca` active, timesteps drawn uniformly from the schedule's
        points t ≥ `taca.t_threshold`, where TACA acts at sampling). CTCAL is not defined for FLUX.1
        (SPEC's methods table).
      taca: the TACA setting of the "taca" objective.
      vae: the frozen VAE, needed when batches carry `images` rather than `latents`.
    """
    check_objective(objective, ("diffusion", "taca"), "FLUX.1")
    if objective == "taca" and taca is None:
        raise ValueError("objective='taca' needs taca=TACA(gamma, t_threshold)")
    encoders = with_remat(encoders, remat)
    transformer = transformer.clone(remat=remat)
    schedule = schedules.flow_match_schedule(num_train_timesteps, shift)
    t_min = taca.t_threshold if objective == "taca" else 0.0
    attn_taca = taca if objective == "taca" else None

    def forward(frozen, trainable, batch, rng):
        r_noise, r_t = jax.random.split(rng)
        emb = encode(encoders, frozen, trainable, batch, t5_embeds=batch.get("t5_embeds"))
        x0 = latents(batch, frozen, vae, jax.random.fold_in(rng, 1))
        noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
        t, sigma = schedules.sample_flow_timesteps_above(r_t, schedule, x0.shape[0], t_min)
        g = jnp.full((x0.shape[0],), guidance, jnp.float32) if transformer.guidance_embeds else None
        pred, _ = transformer.apply(variables(frozen, trainable, "transformer"),
                                    schedules.flow_noisy_input(x0, noise, sigma), t, emb["prompt_embeds"],
                                    emb["pooled_prompt_embeds"], guidance=g, taca=attn_taca)
        return {"pred": pred, "target": schedules.flow_target(x0, noise)}

    return Family(forward=forward, streams={}, ctcal=None, text_inputs=tuple(encoders.models))
