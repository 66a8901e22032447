"""What the trainer draws every `sample_every` steps: each noun's map at the student timestep beside
the teacher's (SPEC §3's alignment maps: sub-token mean, smoothing, min-max), over the example image.

The same examples every time (the data's first batch at the run's seed, at most `MAX_PROMPTS`), the
same noise, t_stu = 0.8·T and the objective's teacher timestep, so successive figures show how
training moves the student's maps towards the teacher's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from ctcal_jax import ctcal, data, schedules, viz
from ctcal_jax.attention import AttnCapture
from ctcal_jax.builder import Pipeline, Run
from ctcal_jax.families.common import encode, latents, variables
from ctcal_jax.models.vae import unscale_latents

MAX_PROMPTS = 4
STUDENT_FRACTION = 0.8


def _clip_stream(pipe: Pipeline) -> tuple[str, str]:
    return ("noun_weights", "token_mask") if pipe.family == "sd2" else ("noun_weights_clip", "token_mask_clip")


def noun_maps(config: ml_collections.ConfigDict, pipe: Pipeline, frozen: Any, trainable: Any,
              batch: dict[str, Any], t: float) -> jax.Array:
    """`[B, h, w, N]` alignment maps of every noun slot (CLIP stream) at timestep `t` (same for all)."""
    x0 = batch["latents"]
    b = x0.shape[0]
    noise = jax.random.normal(jax.random.key(config.seed), x0.shape, x0.dtype)
    ts = jnp.full((b,), t, jnp.float32)
    emb = encode(pipe.encoders, frozen, trainable, batch, **({} if pipe.family == "sd2" else
                                                              {"t5_embeds": batch.get("t5_embeds")}))
    v = variables(frozen, trainable, pipe.denoiser_name)
    if pipe.family == "sd2":
        sched = schedules.ddpm_from_config(pipe.scheduler)
        x_t = schedules.add_noise(sched, x0, noise, ts.astype(jnp.int32))
        _, aux = pipe.denoiser.apply(v, x_t, ts, emb["prompt_embeds"],
                                     capture=AttnCapture(resolutions=(config.ctcal.map_resolution,)))
        maps = aux["attn"]
    else:
        x_t = schedules.flow_noisy_input(x0, noise, schedules.flow_sigmas(ts, config.num_train_timesteps))
        blocks = config.ctcal.capture_blocks
        _, aux = pipe.denoiser.apply(v, x_t, ts, emb["prompt_embeds"], emb["pooled_prompt_embeds"],
                                     capture=AttnCapture(blocks=None if blocks is None else tuple(blocks)))
        maps = aux["attn"][..., :77]
    weights = batch[_clip_stream(pipe)[0]]
    smoothed = ctcal.gaussian_smooth(ctcal.group_mean(maps, weights), config.ctcal.kernel_size, config.ctcal.sigma)
    return ctcal.minmax_normalize(smoothed)


def _images(pipe: Pipeline, frozen: Any, batch: dict[str, Any]) -> np.ndarray:
    """`[B, H, W, 3]` in [0, 1]: the data image, the VAE's decoding of the latents, or (no VAE) the
    latents' first three channels min-max normalised."""
    if "images" in batch:
        return (np.asarray(batch["images"]) + 1) / 2
    if pipe.vae is not None and "vae" in frozen:
        z = unscale_latents(jnp.asarray(batch["latents"]), pipe.vae)
        return np.clip((np.asarray(pipe.vae.apply({"params": frozen["vae"]}, z, method="decode")) + 1) / 2, 0, 1)
    x = np.asarray(batch["latents"])[..., :3]
    lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-6)


def _words(pipe: Pipeline, batch: dict[str, Any], i: int) -> list[str]:
    """The words of sample i's noun slots, decoded from their token positions."""
    tokenizer = pipe.encoders.tokenizers.get("text_encoder")
    weights = np.asarray(batch[_clip_stream(pipe)[0]][i])
    ids = np.asarray(batch["input_ids"]["text_encoder"][i])
    words = []
    for row in weights:
        positions = np.flatnonzero(row > 0)
        if positions.size == 0:
            break
        words.append(tokenizer.decode(ids[positions]).strip() if tokenizer is not None else f"noun {len(words) + 1}")
    return words


def first_examples(config: ml_collections.ConfigDict, pipe: Pipeline) -> dict[str, Any]:
    """The first `MAX_PROMPTS` usable examples of the data, stacked: the figure's fixed inputs."""
    source = data.open_source(config.data, pipe.encoders)
    examples = []
    for i in range(len(source)):
        example = source[i]
        if not data.bad_rows.is_skipped(example):
            examples.append(example)
        if len(examples) == MAX_PROMPTS:
            break
    if not examples:
        raise ValueError(f"{source!r}: no usable example to draw the attention figure from")
    return jax.tree.map(lambda *xs: np.stack(xs), *examples)


def attention_figure(config: ml_collections.ConfigDict, pipe: Pipeline, run: Run, trainable: Any,
                     batch: dict[str, Any]) -> Image.Image | None:
    """The figure for the current `trainable` on `batch` (module docstring); None without CTCAL maps."""
    if run.family.ctcal is None or batch is None:
        return None
    frozen = jax.device_get(run.frozen)
    trainable = jax.device_get(trainable)
    n = min(MAX_PROMPTS, batch["latents"].shape[0] if "latents" in batch else batch["images"].shape[0])
    batch = jax.tree.map(lambda x: np.asarray(x)[:n], batch)
    if "latents" not in batch:
        batch["latents"] = np.asarray(latents(batch, frozen, pipe.vae, jax.random.key(0)))
    t_stu = STUDENT_FRACTION * config.num_train_timesteps
    t_tea = run.family.ctcal.teacher_t or 0.0
    compute = jax.jit(lambda f, tr, bt, t: noun_maps(config, pipe, f, tr, bt, t))
    student, teacher = (np.asarray(compute(frozen, trainable, batch, t)) for t in (t_stu, t_tea))
    images = _images(pipe, frozen, batch)
    rows = []
    for i in range(n):
        words = _words(pipe, batch, i)
        k = len(words)
        prompt = pipe.encoders.tokenizers["text_encoder"].decode(
            np.asarray(batch["input_ids"]["text_encoder"][i]), skip_special_tokens=True).strip() \
            if "text_encoder" in pipe.encoders.tokenizers else f"example {i}"
        rows.append({"prompt": prompt, "image": images[i], "words": words, "student": student[i, ..., :k],
                     "teacher": teacher[i, ..., :k], "t_student": t_stu, "t_teacher": t_tea})
    return viz.attention_figure(rows)
