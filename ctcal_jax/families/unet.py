"""SD 1.x / 2.x for the CTCAL step: CLIP text encoder and UNet (both LoRA-adapted), DDPM noise.

Batch keys: `latents` `[B, h, w, 4]` (VAE latents × scaling factor), `input_ids`
`{"text_encoder": [B, 77] int32}`, `noun_weights` `[B, N, 77]` and `token_mask` `[B, 77]`
(`nouns.prepare_batch`), optional `reward` `[B]`. Frozen: `{"unet", "text_encoder"}`. Trainable:
`{"unet": LoRA, "text_encoder": LoRA (optional), "ae": map autoencoder}`.

t_stu ~ U{0..T−1}; t_tea = 0 (or U[0, t_stu) with `teacher="below"`); the teacher sees the same
latent, the same noise and the same current weights, under `stop_gradient`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import linen as nn

from ctcal_jax import ctcal, schedules, text
from ctcal_jax.attention import AttnCapture
from ctcal_jax.models import remat as remat_lib
from ctcal_jax.train_step import Family


def variables(frozen: Any, trainable: Any, component: str) -> dict[str, Any]:
    """The variables `component` is applied with: its frozen params, and its LoRA (applied unmerged,
    `ctcal_jax.lora`) when `trainable` has one."""
    adapter = trainable.get(component)
    return {"params": frozen[component]} if adapter is None else {"params": frozen[component], "lora": adapter}


def encode(encoders: text.PromptEncoders, frozen: Any, trainable: Any, batch: Any, **kwargs: Any) -> dict[str, Any]:
    """`text.encode_prompts` with the frozen text encoders and their LoRAs from `trainable`."""
    return text.encode_prompts(encoders, {c: frozen[c] for c in encoders.models}, batch["input_ids"],
                               lora={c: trainable[c] for c in encoders.models if c in trainable}, **kwargs)


def with_remat(encoders: text.PromptEncoders, remat: remat_lib.Remat) -> text.PromptEncoders:
    """`encoders` with every text model's `remat` set (`models.remat`); raises ValueError for an unknown policy."""
    remat_lib.check(remat)
    return dataclasses.replace(encoders, models={c: m.clone(remat=remat) for c, m in encoders.models.items()})


def make_family(
    unet: nn.Module,
    encoders: text.PromptEncoders,
    config: ctcal.CTCALConfig,
    *,
    schedule: schedules.Schedule,
    prediction_type: schedules.PredictionType = "epsilon",
    resolution: int = 16,
    remat: remat_lib.Remat = "none",
) -> Family:
    """The SD 1.x/2.x `Family`; `resolution` picks the UNet layers whose maps are captured, `remat` what
    each block of the UNet and the text encoder keeps for the backward pass (`models.remat`)."""
    encoders = with_remat(encoders, remat)
    unet = unet.clone(remat=remat)
    capture = AttnCapture(resolutions=(resolution,))
    num_t = schedule["alphas_cumprod"].shape[0]

    def forward(frozen, trainable, batch, rng):
        r_noise, r_t, r_tea = jax.random.split(rng, 3)
        context = encode(encoders, frozen, trainable, batch)["prompt_embeds"]
        x0 = batch["latents"]
        noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
        t_stu = schedules.uniform_timesteps(r_t, x0.shape[0], num_t)
        t_tea = ctcal.teacher_timesteps(r_tea, t_stu, config, "uniform")
        unet_vars = variables(frozen, trainable, "unet")

        def denoise(v, t, ctx):
            return unet.apply(v, schedules.add_noise(schedule, x0, noise, t), t, ctx, capture=capture)

        _, teacher = denoise(jax.lax.stop_gradient(unet_vars), t_tea, jax.lax.stop_gradient(context))
        pred, student = denoise(unet_vars, t_stu, context)
        return {
            "pred": pred,
            "target": schedules.ddpm_target(schedule, x0, noise, t_stu, prediction_type),
            "student_maps": student["attn"],
            "teacher_maps": jax.lax.stop_gradient(teacher["attn"]),
            "t_stu": t_stu,
            "t_tea": t_tea,
        }

    return Family(forward=forward, streams={"clip": (slice(None), "noun_weights", "token_mask")}, ctcal=config)
