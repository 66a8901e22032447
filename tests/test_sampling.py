"""`sampling.generate` against diffusers' pipelines driving the same tiny models.

The builtin tiny pipelines (`conversion.tiny`, random weights) are loaded twice: by diffusers'
`StableDiffusionPipeline` / `StableDiffusion3Pipeline` (PyTorch, the reference) and by
`sampling.load_pipeline`. Both start from the same initial latents; diffusers' latents after every
step (`callback_on_step_end`) are compared with ours (`return_trajectory=True`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conversion import tiny  # noqa: E402
from ctcal_jax import sampling  # noqa: E402

STEP_TOL, FINAL_TOL = 1e-4, 1e-3


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def sd2():
    folder = tiny.materialize("tiny-sd2")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    return folder, ref, sampling.load_pipeline(folder)


@pytest.fixture(scope="module")
def sd3():
    folder = tiny.materialize("tiny-sd3")
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    return folder, ref, sampling.load_pipeline(folder)


def run_diffusers(ref, latents_nhwc, **kwargs):
    """diffusers' latents after every step `[N, B, h, w, C]` and its final latents."""
    steps = []

    def keep(pipe, i, t, kw):
        steps.append(kw["latents"].permute(0, 2, 3, 1).numpy().copy())
        return kw

    latents = torch.from_numpy(np.asarray(latents_nhwc)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        final = ref(latents=latents, output_type="latent", callback_on_step_end=keep, **kwargs).images
    return np.stack(steps), final.permute(0, 2, 3, 1).numpy()


def assert_trajectories(ours, theirs_steps, theirs_final):
    assert ours["trajectory"].shape == theirs_steps.shape
    errors = [rel(a, b) for a, b in zip(ours["trajectory"], theirs_steps)]
    assert max(errors) <= STEP_TOL, errors
    assert rel(ours["latents"], theirs_final) <= FINAL_TOL


def scheduler_config(ref, **overrides):
    """The reference's scheduler config with `overrides`, without diffusers' private keys
    (`_use_default_values` would make `from_config` drop the overrides of keys it lists)."""
    return {k: v for k, v in ref.scheduler.config.items() if not k.startswith("_")} | overrides


SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler"}


@pytest.mark.parametrize("kind,prediction,spacing", [
    ("ddim", "epsilon", None), ("ddim", "v_prediction", None), ("ddim", "v_prediction", "trailing"),
    ("ddpm", "epsilon", None), ("ddpm", "v_prediction", "linspace"),
    ("euler", "epsilon", None), ("euler", "v_prediction", "trailing"),
])
def test_sd_pipeline_trajectory_equals_diffusers(sd2, kind, prediction, spacing):
    _, ref, pipe = sd2
    config = scheduler_config(ref, prediction_type=prediction, **({"timestep_spacing": spacing} if spacing else {}))
    ref.scheduler = getattr(diffusers, SCHEDULERS[kind]).from_config(config)
    ours_pipe = dataclasses.replace(pipe, scheduler=config)
    prompts = ["a violet teapot beside a wooden spoon", "two dogs under a bridge"]
    n, b = 6, len(prompts)
    x = np.random.default_rng(1).standard_normal((b, 32, 32, 4)).astype(np.float32)
    kwargs = dict(num_inference_steps=n, guidance_scale=6.0, negative_prompt=["", "blurry"])
    noise = None
    if kind == "ddpm":  # diffusers draws the variance noise from the generator, once per step with t > 0
        gen = torch.Generator().manual_seed(7)
        probe = getattr(diffusers, SCHEDULERS[kind]).from_config(config)
        probe.set_timesteps(n)
        noise = np.stack([torch.randn((b, 4, 32, 32), generator=gen).permute(0, 2, 3, 1).numpy() if int(t) > 0
                          else np.zeros((b, 32, 32, 4), np.float32) for t in probe.timesteps])
        kwargs["generator"] = torch.Generator().manual_seed(7)
    steps, final = run_diffusers(ref, x, prompt=prompts, **kwargs)
    ours = sampling.generate(ours_pipe, prompts, num_inference_steps=n, guidance_scale=6.0, scheduler=kind,
                             latents=x, negative_prompts=["", "blurry"], step_noise=noise, decode=False,
                             return_trajectory=True)
    assert_trajectories(ours, steps, final)


@pytest.mark.parametrize("dynamic", [False, True])
def test_sd3_pipeline_trajectory_equals_diffusers(sd3, dynamic):
    _, ref, pipe = sd3
    # dynamic: FLUX-style resolution-dependent shift, which SD3's pipeline also honours
    config = scheduler_config(ref, **({"use_dynamic_shifting": True, "base_image_seq_len": 64,
                                       "max_image_seq_len": 1024} if dynamic else {}))
    ref.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    ours_pipe = dataclasses.replace(pipe, scheduler=config)
    prompts = ["an orange kite above a lighthouse", "a bowl of lemons"]
    x = np.random.default_rng(2).standard_normal((2, 32, 32, 16)).astype(np.float32)
    steps, final = run_diffusers(ref, x, prompt=prompts, num_inference_steps=5, guidance_scale=5.0)
    ours = sampling.generate(ours_pipe, prompts, num_inference_steps=5, guidance_scale=5.0, latents=x,
                             decode=False, return_trajectory=True)
    assert_trajectories(ours, steps, final)


def test_any_resolution_equals_diffusers(sd2):
    """A non-square size that is not the model's default (latents 24×40)."""
    _, ref, pipe = sd2
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler)  # the folder's, as ours
    x = np.random.default_rng(5).standard_normal((1, 24, 40, 4)).astype(np.float32)
    steps, final = run_diffusers(ref, x, prompt="a long red train", num_inference_steps=3, height=192, width=320)
    ours = sampling.generate(pipe, "a long red train", num_inference_steps=3, scheduler="euler", latents=x,
                             height=192, width=320, decode=False, return_trajectory=True)
    assert_trajectories(ours, steps, final)


@pytest.mark.slow  # make test's budget: bf16 models and LoRA are checked there
def test_bf16_pipeline_samples_close_to_fp32():
    """bf16 weights and compute; latents carried in float32. Loose: bf16 has 8 mantissa bits."""
    pipe16 = sampling.load_pipeline("builtin:tiny-sd2", dtype=jnp.bfloat16)
    pipe32 = sampling.load_pipeline("builtin:tiny-sd2")
    kw = dict(num_inference_steps=3, guidance_scale=3.0, seed=1)
    a, b = sampling.generate(pipe16, "a cup", **kw), sampling.generate(pipe32, "a cup", **kw)
    assert a["latents"].dtype == jnp.float32 and a["images"].dtype == jnp.float32
    assert rel(a["latents"], b["latents"]) < 0.05


def test_images_equal_diffusers_decoding(sd2):
    _, ref, pipe = sd2
    ref.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler)
    x = np.random.default_rng(3).standard_normal((1, 32, 32, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = ref(prompt="a green bicycle", latents=torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                     num_inference_steps=3, output_type="np").images
    ours = sampling.generate(pipe, "a green bicycle", num_inference_steps=3, latents=x)
    assert ours["images"].shape == theirs.shape == (1, 256, 256, 3)
    assert np.abs(np.asarray(ours["images"]) - theirs).max() <= 1e-3


def test_without_guidance_no_negative_half(sd2):
    """guidance_scale <= 1 runs the conditional half only, as the pipelines do."""
    _, ref, pipe = sd2
    ref.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler)
    x = np.random.default_rng(4).standard_normal((1, 32, 32, 4)).astype(np.float32)
    steps, final = run_diffusers(ref, x, prompt="a teal door", num_inference_steps=4, guidance_scale=1.0)
    ours = sampling.generate(pipe, "a teal door", num_inference_steps=4, guidance_scale=1.0, latents=x,
                             decode=False, return_trajectory=True)
    assert_trajectories(ours, steps, final)


def test_seeds_are_per_sample(sd2):
    """A sample's noise depends on its seed only, not on the batch it is drawn in."""
    _, _, pipe = sd2
    one = sampling.generate(pipe, ["a cat"], seed=[11], num_inference_steps=2, decode=False)
    two = sampling.generate(pipe, ["a dog", "a cat"], seed=[5, 11], num_inference_steps=2, decode=False)
    np.testing.assert_allclose(two["latents"][1], one["latents"][0], rtol=1e-4, atol=1e-4)  # batch-size rounding
    assert not np.allclose(two["latents"][0], two["latents"][1])


def test_bad_arguments_name_what_is_wrong(sd2, sd3):
    _, _, pipe = sd2
    with pytest.raises(ValueError, match="scheduler='flow_euler'"):
        sampling.generate(pipe, "x", scheduler="flow_euler")
    with pytest.raises(ValueError, match="latents: expected shape"):
        sampling.generate(pipe, "x", latents=np.zeros((1, 4, 32, 32)))
    with pytest.raises(ValueError, match="seed: expected one int or 2"):
        sampling.generate(pipe, ["x", "y"], seed=[1, 2, 3])
    with pytest.raises(ValueError, match="taca applies to MM-DiT"):
        from ctcal_jax.attention import TACA

        sampling.generate(pipe, "x", taca=TACA())
    with pytest.raises(ValueError, match="height=100"):
        sampling.generate(pipe, "x", height=100)
    with pytest.raises(ValueError, match="lora has adapters for 'transformer'"):
        sampling.generate(pipe, "x", lora={"transformer": {}})
