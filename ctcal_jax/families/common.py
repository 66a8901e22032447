"""What both model families share: the variables a component is applied with, prompt encoding with
the trainable text LoRAs, remat on the text encoders, and the latents of a batch.

A batch carries either `latents` `[B, h, w, Z]` (prepared data: VAE latents, already scaled as the
denoiser sees them) or `images` `[B, H, W, 3]` in [-1, 1] (an image folder read directly), which the
frozen VAE encodes inside the step: a posterior sample `mean + exp(logvar / 2)·n`, scaled
(`models.vae.scale_latents`), as diffusers' training scripts do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import linen as nn

from ctcal_jax import text
from ctcal_jax.models import remat as remat_lib
from ctcal_jax.models.vae import scale_latents

Objective = str  # "ctcal" | "diffusion" | "taca" (SD3 only); see `train_step.Family`


def check_objective(objective: Objective, allowed: tuple[str, ...], family: str) -> None:
    if objective not in allowed:
        raise ValueError(f"objective={objective!r} is not available for {family} (choose from {allowed})")


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


def latents(batch: Any, frozen: Any, vae: nn.Module | None, rng: jax.Array) -> jax.Array:
    """The batch's denoiser latents `[B, h, w, Z]` (module docstring); the VAE is frozen."""
    if "latents" in batch:
        return batch["latents"]
    if "images" not in batch:
        raise ValueError(f"batch: expected 'latents' or 'images', got keys {sorted(batch)}")
    if vae is None or "vae" not in frozen:
        raise ValueError("batch has 'images' but the step has no VAE to encode them (load the pipeline's vae)")
    mean, logvar = vae.apply({"params": jax.lax.stop_gradient(frozen["vae"])}, batch["images"], method="encode")
    z = mean + jax.numpy.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return jax.lax.stop_gradient(scale_latents(z, vae))
