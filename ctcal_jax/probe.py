"""What the trainer draws every `sample_every` steps: each noun's map at the student timestep beside
the teacher's (SPEC §3's alignment maps: sub-token mean, smoothing, min-max), over the example image.

The same examples every time (the data source's first usable rows, at most `MAX_PROMPTS`), the
same noise, t_stu = 0.8·T and the objective's teacher timestep, so successive figures show how
training moves the student's maps towards the teacher's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ctcal_jax import data, maps, schedules, viz
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
        attn = aux["attn"]
    else:
        x_t = schedules.flow_noisy_input(x0, noise, schedules.flow_sigmas(ts, config.num_train_timesteps))
        blocks = config.ctcal.capture_blocks
        _, aux = pipe.denoiser.apply(v, x_t, ts, emb["prompt_embeds"], emb["pooled_prompt_embeds"],
                                     capture=AttnCapture(blocks=None if blocks is None else tuple(blocks)))
        attn = aux["attn"][..., :77]
    weights = batch[_clip_stream(pipe)[0]]
    smoothed = maps.gaussian_smooth(maps.group_mean(attn, weights), config.ctcal.kernel_size, config.ctcal.sigma)
    return maps.minmax_normalize(smoothed)


def images(pipe: Pipeline, frozen: Any, batch: dict[str, Any]) -> jax.Array:
    """`[B, H, W, 3]` in [0, 1]: the data image, the VAE's decoding of the latents, or (no VAE) the
    latents' first three channels min-max normalised."""
    if "images" in batch:
        return (batch["images"] + 1) / 2
    if pipe.vae is not None and "vae" in frozen:
        z = unscale_latents(batch["latents"], pipe.vae)
        return jnp.clip((pipe.vae.apply({"params": frozen["vae"]}, z, method="decode") + 1) / 2, 0, 1)
    x = batch["latents"][..., :3]
    lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    return (x - lo) / jnp.maximum(hi - lo, 1e-6)


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


def figure_maker(config: ml_collections.ConfigDict, pipe: Pipeline, run: Run) -> Callable[[Any], Image.Image] | None:
    """`draw(trainable) -> PIL image` of the module docstring, compiled once; None when the objective
    captures no maps (diffusion-only, TACA) or `config.sample_every` is 0.

    The computation runs on the mesh with the frozen weights where they are (sharded, on every
    host) and returns replicated maps, so every host can draw; the trainer saves host 0's.
    """
    if run.family.ctcal is None or not config.sample_every:
        return None
    batch = first_examples(config, pipe)
    t_stu = STUDENT_FRACTION * config.num_train_timesteps
    t_tea = run.family.ctcal.teacher_t or 0.0

    @functools.partial(jax.jit, out_shardings=NamedSharding(run.mesh, PartitionSpec()))
    def compute(frozen, trainable, batch):
        if "latents" not in batch:
            batch = {**batch, "latents": latents(batch, frozen, pipe.vae, jax.random.key(config.seed))}
        return {"student": noun_maps(config, pipe, frozen, trainable, batch, t_stu),
                "teacher": noun_maps(config, pipe, frozen, trainable, batch, t_tea),
                "images": images(pipe, frozen, batch)}

    tokenizer = pipe.encoders.tokenizers.get("text_encoder")
    words = [_words(pipe, batch, i) for i in range(len(batch["input_ids"]["text_encoder"]))]
    prompts = [tokenizer.decode(ids, skip_special_tokens=True).strip() if tokenizer is not None else f"example {i}"
               for i, ids in enumerate(np.asarray(batch["input_ids"]["text_encoder"]))]

    def draw(trainable: Any) -> Image.Image:
        out = jax.device_get(compute(run.frozen, trainable, batch))
        return viz.attention_figure([
            {"prompt": prompts[i], "image": out["images"][i], "words": w, "student": out["student"][i, ..., :len(w)],
             "teacher": out["teacher"][i, ..., :len(w)], "t_student": t_stu, "t_teacher": t_tea}
            for i, w in enumerate(words)])

    return draw
