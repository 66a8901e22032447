"""SD 1.x / 2.x for the CTCAL step: CLIP text encoder and UNet (both LoRA-adapted), DDPM noise.

Batch keys: `latents` `[B, h, w, 4]` (VAE latents × scaling factor) or `images` (`families.common`), `input_ids`
`{"text_encoder": [B, 77] int32}`, `noun_weights` `[B, N, 77]` and `token_mask` `[B, 77]`
(`nouns.prepare_batch`), optional `reward` `[B]`. Frozen: `{"unet", "text_encoder"}`. Trainable:
`{"unet": LoRA, "text_encoder": LoRA (optional), "ae": map autoencoder}`.

Objectives: "ctcal" (SPEC §3) or "diffusion" (the plain loss; GORS when the data carries rewards).
t_stu ~ U{0..T−1}; t_tea = 0 (or U[0, t_stu) with `teacher="below"`); the teacher sees the same
latent, the same noise and the same current weights, under `stop_gradient`.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from ctcal_jax import ctcal, schedules, text
from ctcal_jax.attention import AttnCapture
from ctcal_jax.families.common import Objective, check_objective, encode, latents, variables, with_remat
from ctcal_jax.models import remat as remat_lib
from ctcal_jax.train_step import Family


def make_family(
    unet: nn.Module,
    encoders: text.PromptEncoders,
    config: ctcal.CTCALConfig | None,
    *,
    schedule: schedules.Schedule,
    prediction_type: schedules.PredictionType = "epsilon",
    resolution: int = 16,
    remat: remat_lib.Remat = "none",
    objective: Objective = "ctcal",
    vae: nn.Module | None = None,
) -> Family:
    """The SD 1.x/2.x `Family`.

    Args:
      config: the CTCAL loss (`objective="ctcal"`); ignored by `"diffusion"` (the diffusion-only and
        GORS baselines: the plain noise-prediction loss, reward-weighted when the batch has `reward`).
      resolution: which UNet layers' maps are captured (r × r).
      remat: what each block of the UNet and the text encoder keeps for the backward pass (`models.remat`).
      vae: the frozen VAE, needed when batches carry `images` rather than `latents`.
    """
    check_objective(objective, ("ctcal", "diffusion"), "SD 1.x/2.x")
    encoders = with_remat(encoders, remat)
    text_inputs = tuple(encoders.models)
    unet = unet.clone(remat=remat)
    with_ctcal = objective == "ctcal"
    capture = AttnCapture(resolutions=(resolution,)) if with_ctcal else None
    num_t = schedule["alphas_cumprod"].shape[0]

    def forward(frozen, trainable, batch, rng):
        r_noise, r_t, r_tea = jax.random.split(rng, 3)
        context = encode(encoders, frozen, trainable, batch)["prompt_embeds"]
        x0 = latents(batch, frozen, vae, jax.random.fold_in(rng, 1))
        noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
        t_stu = schedules.uniform_timesteps(r_t, x0.shape[0], num_t)
        unet_vars = variables(frozen, trainable, "unet")

        def denoise(v, t, ctx):
            return unet.apply(v, schedules.add_noise(schedule, x0, noise, t), t, ctx, capture=capture)

        pred, student = denoise(unet_vars, t_stu, context)
        out = {"pred": pred, "target": schedules.ddpm_target(schedule, x0, noise, t_stu, prediction_type)}
        if with_ctcal:
            t_tea = ctcal.teacher_timesteps(r_tea, t_stu, config, "uniform")
            _, teacher = denoise(jax.lax.stop_gradient(unet_vars), t_tea, jax.lax.stop_gradient(context))
            out.update(student_maps=student["attn"], teacher_maps=jax.lax.stop_gradient(teacher["attn"]),
                       t_stu=t_stu, t_tea=t_tea)
        return out

    if not with_ctcal:
        return Family(forward=forward, streams={}, ctcal=None, text_inputs=text_inputs)
    return Family(forward=forward, streams={"clip": (slice(None), "noun_weights", "token_mask")}, ctcal=config,
                  text_inputs=text_inputs)
