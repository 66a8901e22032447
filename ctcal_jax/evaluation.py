"""What the trainer measures on the shapes world (`data.kind = "shapes"`, `config.eval.every > 0`):
before the first step, every `eval.every` steps and after the last, the exact evaluator's
accuracies (`data.shapes_eval.score`) on fixed prompt sets, one per category (`shapes.CATEGORIES`),
sampled from the model with the adapters of that moment, and a figure of one sample per category
with each noun's attention overlaid (`scorers.overlay_figure`).

The prompt sets, seeds and sampler settings are the same at every evaluation (`config.eval.*`), so
the rows of `eval.jsonl` differ only by what training changed. Sampling is
`sampling.generate` (DDIM for SD 1.x/2.x, flow-matching Euler for SD3), compiled once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from ctcal_jax import sampling, scorers, viz
from ctcal_jax.builder import Pipeline
from ctcal_jax.data import shapes, shapes_eval

Evaluator = Callable[[Any], tuple[dict[str, float], Image.Image]]


def shapes_evaluator(config: ml_collections.ConfigDict, pipe: Pipeline) -> Evaluator | None:
    """`evaluate(trainable) -> (metrics, figure)` (module docstring); None unless the data is the
    shapes world and `config.eval.every` is set. `metrics` are `eval/<category>/<score>` plus
    `eval/all/correct` (the mean over categories)."""
    e = config.eval
    if config.data.kind != "shapes" or not e.every:
        return None
    if jax.process_count() > 1:
        raise ValueError("config.eval.every: the shapes evaluation samples on one host; set it to 0 on a pod")
    sets = {c: shapes.prompt_set(c, split=e.split, n=e.n, seed=e.seed, size=config.data.resolution)
            for c in shapes.CATEGORIES}
    scenes = [s for c in shapes.CATEGORIES for s in sets[c]]
    prompts = [s.prompt for s in scenes]

    def evaluate(trainable: Any) -> tuple[dict[str, float], Image.Image]:
        adapters = {c: lp for c, lp in trainable.items() if c != "ae"}
        out = sampling.generate(pipe, prompts, num_inference_steps=e.num_inference_steps,
                                guidance_scale=e.guidance_scale, seed=e.seed, height=config.data.resolution,
                                width=config.data.resolution, lora=adapters or None, return_attn=True)
        images, attn = np.asarray(out["images"]), np.asarray(out["attn"])
        metrics, figures = {}, []
        for i, category in enumerate(shapes.CATEGORIES):
            rows = slice(i * e.n, (i + 1) * e.n)
            for key, value in shapes_eval.score(images[rows], scenes[rows]).items():
                if key != "n" and value is not None:
                    metrics[f"eval/{category}/{key}"] = value
            first = i * e.n
            figures.append(scorers.overlay_figure(pipe, prompts[first], scenes[first].nouns,
                                                  attn[first:first + 1], images[first]))
        metrics["eval/all/correct"] = float(np.mean([metrics[f"eval/{c}/correct"] for c in shapes.CATEGORIES]))
        return metrics, viz.stack(figures)

    return evaluate

