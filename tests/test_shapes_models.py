"""The shapes world's shipped bases (`builtin:shapes-sd2`, `builtin:shapes-sd3`, `ctcal_jax/assets/`):
they load like any diffusers folder (ours and diffusers'), our sampler on them equals diffusers'
pipeline, the SD 2.x base draws what single-object prompts ask for (the exact evaluator), and
`python -m ctcal_jax.pretrain_shapes` runs end to end for a few steps (pretraining itself never runs
here: it ran on an accelerator, `assets/pretrain_report.json`)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conversion import load_component
from conversion.pipeline import ASSETS, SHIPPED, resolve
from ctcal_jax import pretrain_shapes, sampling
from ctcal_jax.data import shapes, shapes_eval

COMPONENTS = {"shapes-sd2": ("unet", "text_encoder", "vae"),
              "shapes-sd3": ("transformer", "text_encoder", "text_encoder_2", "vae")}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_bases_load_with_load_component(name):
    folder = resolve(f"builtin:{name}")
    assert folder == ASSETS / name
    for component in COMPONENTS[name]:
        _, params = load_component(folder, component)
        leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
        assert leaves and all(x.dtype == np.float32 and np.isfinite(x).all() for x in leaves), component


def test_the_sd2_base_draws_single_objects_and_the_report_says_how_well():
    """Eight validation prompts of one object, 10 DDIM steps: the exact evaluator finds nearly all
    (the report measured 64/64 with 25 steps). Its composition numbers leave room to improve."""
    pipe = sampling.load_pipeline("builtin:shapes-sd2")
    scenes = shapes.prompt_set("single", split="validation", n=8)
    out = sampling.generate(pipe, [s.prompt for s in scenes], num_inference_steps=10, guidance_scale=5.0, seed=0)
    assert out["images"].shape == (8, 32, 32, 3)
    assert shapes_eval.score(np.asarray(out["images"]), scenes)["objects"] >= 0.75
    report = json.loads((ASSETS / "pretrain_report.json").read_text())
    sd2 = report["shapes-sd2"]["sd2"]["eval"]
    assert sd2["single"]["correct"] > 0.9 and sd2["relation"]["correct"] < 0.9


def test_diffusers_loads_the_shipped_base_and_our_sampler_equals_its_pipeline():
    import diffusers
    import torch

    folder = resolve("builtin:shapes-sd2")
    # The weights are stored in float16; diffusers keeps that dtype unless told (float16 does not run on CPU).
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                            feature_extractor=None, requires_safety_checker=False)
    pipe = sampling.load_pipeline(folder)
    prompts = ["a red circle to the left of a blue square", "a large green triangle"]
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = ref(prompts, latents=torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), num_inference_steps=4,
                     guidance_scale=5.0, output_type="np").images
    ours = sampling.generate(pipe, prompts, num_inference_steps=4, guidance_scale=5.0, latents=x)
    assert ours["images"].shape == theirs.shape == (2, 32, 32, 3)
    assert np.abs(np.asarray(ours["images"]) - theirs).max() <= 1e-3


def test_pretrain_shapes_runs_end_to_end_for_a_few_steps(tmp_path):
    s = pretrain_shapes.Settings(rows=32, vae_steps=2, sd2_steps=2, batch=2, vae_batch=2, eval_n=1, eval_steps=2,
                                 log_every=1)
    report = pretrain_shapes.run(tmp_path, s, stages=("sd2",))
    assert set(report["sd2"]["eval"]) == set(shapes.CATEGORIES)
    assert json.loads((tmp_path / "report.json").read_text())["sd2"]["steps"] == 2
    folder = tmp_path / "shapes-sd2"
    _, params = load_component(folder, "text_encoder")
    embedding = np.asarray(params["text_model"]["embeddings"]["token_embedding"]["embedding"])
    used = pretrain_shapes.vocabulary_ids(["a red circle"])
    # Rows of tokens the world never uses are zero; the world's own are not.
    assert np.abs(embedding[used]).sum(axis=1).min() > 0
    assert (np.abs(embedding).sum(axis=1) > 0).sum() < 200
    pipe = sampling.load_pipeline(folder)
    assert pipe.family == "sd2" and pipe.latent_size == 16
