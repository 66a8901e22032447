"""Scorers for the IterRef step sweep (`python -m ctcal_jax.sample --sweep-steps ...`), and the
processed subject maps that the sampler's overlays draw.

A scorer is `scorer(images, prompts) -> scores`: images `[B, H, W, 3]` float in [0, 1], one prompt
per image, scores `[B]` float (higher is better). The sampler's `--scorer module:function` imports one
(a CLIP score, a VQA model, ...: anything with that signature).

The built-in one, `subject_attention(pipe, ...)`, needs no other model: it encodes each image with
the pipeline's VAE, noises it to a small timestep (t = 50 of 1000 by default) with fixed noise, runs
the denoiser's conditional forward on the image's own prompt and takes the image→text maps (SPEC §2),
processed as IterRef processes them (re-weighting, sub-token mean, smoothing). The score is
`1 − L_CN = min over subjects of the peak of the subject's map` (capped at 1), per text stream,
averaged over streams (SD3: CLIP and T5). It measures whether the denoiser, looking at the finished
image, finds a strong peak for every subject: it punishes a subject that is missing or drowned by
another (neglect), the failure IterRef targets. Its limits: it is the model judging itself, the
quantity IterRef optimises (a sweep can reward latents that excite the maps without drawing the
object), it says nothing about attributes, counts or positions, and with random weights (the
built-in tiny pipelines) it measures the machinery only. Use an independent scorer
(`--scorer module:function`, e.g. BLIP-VQA or a detector) to choose a step for a paper table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ctcal_jax import iterref, maps, sampling, schedules, text, viz
from ctcal_jax.attention import AttnCapture
from ctcal_jax.builder import Pipeline
from ctcal_jax.models.vae import scale_latents

Scorer = Callable[[np.ndarray, list[str]], np.ndarray]
DEFAULT_TIMESTEP = 50.0  # scheduler units: nearly clean, so the maps describe the finished image


def subject_maps(attn: Any, weights: Any, mask: Any, spans: Sequence[tuple[int, int]], kernel_size: int,
                 sigma: float = 0.5) -> jax.Array:
    """Raw maps `attn` `[B, h, w, T]`, subject weights `[B, G, T]` and real-token mask `[B, T]` (on the
    whole token axis, `sampling.subject_weights`) -> processed subject maps `[B, S, G, h, w]`, one per
    text stream `spans[s]` (`iterref.subject_maps`: re-weighting, sub-token mean, smoothing)."""
    attn, weights, mask = jnp.asarray(attn, jnp.float32), jnp.asarray(weights), jnp.asarray(mask, bool)
    one = jax.vmap(lambda a, w, m: iterref.subject_maps(a, w, m, kernel_size, sigma))
    return jnp.stack([one(attn[..., s:e], weights[..., s:e], mask[..., s:e]) for s, e in spans], axis=1)


def peak_score(processed: jax.Array, weights: Any, spans: Sequence[tuple[int, int]]) -> jax.Array:
    """`[B, S, G, h, w]` processed maps -> `[B]`: per stream `1 − L_CN` (the lowest subject peak, capped
    at 1; 1 when the stream has no subject), averaged over streams."""
    weights = jnp.asarray(weights)
    per_stream = []
    for i, (s, e) in enumerate(spans):
        valid = weights[..., s:e].sum(-1) > 0  # [B, G]
        per_stream.append(1.0 - jax.vmap(iterref.cn_loss)(processed[:, i], valid))
    return sum(per_stream) / len(per_stream)


def overlay_maps(processed: jax.Array) -> np.ndarray:
    """`[B, S, G, h, w]` -> `[B, h, w, G]` for `viz.subject_figure`: the streams' mean, min-max
    normalised over space per subject."""
    return np.asarray(maps.minmax_normalize(processed.mean(axis=1).transpose(0, 2, 3, 1)))


def overlay_figure(pipe: Pipeline, prompt: str, words: Sequence[str], attn: Any, image: Any) -> Any:
    """One sample's figure (`viz.subject_figure`): the image and each subject word's map, from the
    sample's step-averaged maps `attn` `[1, h, w, T]` (`generate(..., return_attn=True)`)."""
    weights, mask = sampling.subject_weights(pipe, [prompt], [list(words)])
    kernel = sampling.map_kernel(pipe)
    processed = overlay_maps(subject_maps(attn, weights, mask, sampling.stream_spans(pipe), kernel))[0]
    return viz.subject_figure(prompt, image, list(words), processed[..., :len(words)])


def subject_attention(pipe: Pipeline, *, subjects: Mapping[str, Sequence[str]] | None = None,
                      tagger: Any = "stanza", timestep: float = DEFAULT_TIMESTEP, seed: int = 0,
                      kernel_size: int | None = None, sigma: float = 0.5, guidance: float | None = None) -> Scorer:
    """The built-in scorer (module docstring) for `pipe`: `(images [B, H, W, 3] in [0, 1], prompts)
    -> [B]` scores in [0, 1]. `subjects` maps a prompt to its subject words; other prompts are tagged
    with `tagger` ("stanza" or a callable, `nouns.tag`). `guidance`: FLUX.1-dev's embedded guidance
    scale (default `sampling.DEFAULT_GUIDANCE`, 3.5); other models take none. Compiled once per batch shape."""
    if pipe.vae is None:
        raise ValueError(f"the subject-attention scorer encodes images with the VAE; {pipe.source!r} has none")
    kernel = kernel_size or sampling.map_kernel(pipe)
    embeds_guidance = pipe.family == "flux" and pipe.denoiser.guidance_embeds
    guidance = sampling.DEFAULT_GUIDANCE[pipe.family] if guidance is None else float(guidance)
    spans = sampling.stream_spans(pipe)
    name = pipe.denoiser_name

    @jax.jit
    def scores(params, tokens, images, weights, mask):
        mean, _ = pipe.vae.apply({"params": params["vae"]}, images * 2.0 - 1.0, method="encode")
        x0 = scale_latents(mean, pipe.vae)
        # The same noise for every image: a score does not depend on the batch an image is in.
        noise = jnp.broadcast_to(jax.random.normal(jax.random.key(seed), x0.shape[1:], x0.dtype), x0.shape)
        t = jnp.full((x0.shape[0],), timestep, jnp.float32)
        cond = text.encode_prompts(pipe.encoders, params, tokens)
        if pipe.family == "sd2":
            x_t = schedules.add_noise(schedules.ddpm_from_config(pipe.scheduler), x0, noise, t.astype(jnp.int32))
            capture = AttnCapture(resolutions=(sampling.coarsest_attention(pipe, x0.shape[1]),))
            _, aux = pipe.denoiser.apply({"params": params[name]}, x_t, t, cond["prompt_embeds"], capture=capture)
        else:
            x_t = schedules.flow_noisy_input(x0, noise, schedules.flow_sigmas(t))
            extra = {"guidance": jnp.full((x0.shape[0],), guidance, jnp.float32)} if embeds_guidance else {}
            _, aux = pipe.denoiser.apply({"params": params[name]}, x_t, t, cond["prompt_embeds"],
                                         cond["pooled_prompt_embeds"], capture=AttnCapture(blocks=None), **extra)
        return peak_score(subject_maps(aux["attn"], weights, mask, spans, kernel, sigma), weights, spans)

    def score(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        prompts = list(prompts)
        given = [list(subjects[p]) if subjects is not None and p in subjects else None for p in prompts]
        weights, mask = sampling.subject_weights(pipe, prompts, given, tagger)
        tokens = {c: jnp.asarray(t["input_ids"]) for c, t in text.tokenize_prompts(pipe.encoders, prompts).items()}
        out = scores(pipe.params, tokens, jnp.asarray(images, jnp.float32), jnp.asarray(weights), jnp.asarray(mask))
        return np.asarray(out, np.float64)

    return score
