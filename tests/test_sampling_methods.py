"""TACA, the TACA LoRA gate and IterRef inside `sampling.generate`, against step-by-step references
written from the denoiser and the scheduler step directly (tiny random pipelines)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctcal_jax import iterref, lora, samplers, sampling, text
from ctcal_jax.attention import TACA, AttnCapture


@pytest.fixture(scope="module")
def sd3():
    return sampling.load_pipeline("builtin:tiny-sd3")


@pytest.fixture(scope="module")
def sd2():
    return sampling.load_pipeline("builtin:tiny-sd2")


def random_lora(params, seed=0):
    """Adapters on every joint-attention projection with random, non-zero B (an untrained init is a no-op)."""
    lp = lora.init(jax.random.key(seed), params, targets=r"attn\.(to_q|to_k|to_v|add_k_proj)$", rank=4, alpha=8)
    adapters = lora.adapters(lp)
    keys = jax.random.split(jax.random.key(seed + 1), len(adapters))
    return lora.from_paths({p: {**ad, "B": 0.3 * jax.random.normal(k, ad["B"].shape)}
                            for k, (p, ad) in zip(keys, adapters.items())})


def reference_flow(pipe, prompt, x, n, guidance, taca, lp, cond_only):
    """diffusers' SD3 loop written out: TACA and the merged LoRA per CFG half, step by step."""
    plan = samplers.plan("flow_euler", pipe.scheduler, n)
    params = pipe.params["transformer"]
    merged = lora.merge(params, lp) if lp is not None else params
    cond = text.encode_text(pipe.encoders, pipe.params, [prompt])
    neg = text.encode_text(pipe.encoders, pipe.params, [""])
    x = jnp.asarray(x)
    for i, t in enumerate(plan.timesteps):
        active = taca is not None and t >= taca.t_threshold

        def forward(p, embeds, use_taca):
            return pipe.denoiser.apply({"params": p}, x, jnp.full((1,), t), embeds["prompt_embeds"],
                                       embeds["pooled_prompt_embeds"], taca=taca if use_taca else None)[0]

        u = forward(merged if active and not cond_only else params, neg, not cond_only)
        c = forward(merged if active else params, cond, True)
        out = u + guidance * (c - u)
        x = x + (plan.tables["sigma_next"][i] - plan.tables["sigma"][i]) * out
    return np.asarray(x)


@pytest.mark.parametrize("cond_only", [False, True])
def test_taca_and_its_lora_gate_equal_the_step_by_step_reference(sd3, cond_only):
    """γ(t) on the chosen CFG halves, the LoRA active exactly while TACA is (steps with t ≥ 800:
    two of five here), as a loop that merges the LoRA on those steps only."""
    lp = random_lora(sd3.params["transformer"])
    taca = TACA(gamma=1.6, t_threshold=800.0)
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 16)).astype(np.float32)
    ours = sampling.generate(sd3, "a red kite over a blue lake", num_inference_steps=5, guidance_scale=4.0,
                             latents=x, taca=taca, lora={"transformer": lp}, taca_cond_only=cond_only, decode=False)
    ref = reference_flow(sd3, "a red kite over a blue lake", x, 5, 4.0, taca, lp, cond_only)
    np.testing.assert_allclose(ours["latents"], ref, rtol=1e-4, atol=1e-4)
    plain = sampling.generate(sd3, "a red kite over a blue lake", num_inference_steps=5, guidance_scale=4.0,
                              latents=x, decode=False)
    assert np.abs(ours["latents"] - plain["latents"]).max() > 1e-2  # TACA and the LoRA did act


def test_gamma_one_equals_no_taca(sd3):
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 16)).astype(np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, latents=x, decode=False)
    with_taca = sampling.generate(sd3, ["a cat", "a dog"], taca=TACA(gamma=1.0, t_threshold=0.0), **kw)
    without = sampling.generate(sd3, ["a cat", "a dog"], **kw)
    np.testing.assert_allclose(with_taca["latents"], without["latents"], rtol=1e-5, atol=1e-5)


def test_lora_without_taca_is_always_on(sd3):
    """No TACA: the LoRA is on at every step, equal to sampling with the merged weights."""
    lp = random_lora(sd3.params["transformer"], seed=3)
    merged = dataclasses.replace(sd3, params={**sd3.params, "transformer": lora.merge(sd3.params["transformer"], lp)})
    x = np.random.default_rng(2).standard_normal((1, 32, 32, 16)).astype(np.float32)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, latents=x, decode=False)
    np.testing.assert_allclose(sampling.generate(sd3, "a kite", lora={"transformer": lp}, **kw)["latents"],
                               sampling.generate(merged, "a kite", **kw)["latents"], rtol=1e-4, atol=1e-4)


def subject_setup(pipe, prompt, words):
    weights, mask = sampling.subject_weights(pipe, [prompt], [words])
    cond = text.encode_text(pipe.encoders, pipe.params, [prompt])

    def denoise_fn(z, t):
        return pipe.denoiser.apply({"params": pipe.params["unet"]}, z, jnp.full((z.shape[0],), t),
                                   cond["prompt_embeds"], capture=AttnCapture(resolutions=(16,)))

    def loss(z, t):
        return iterref.batch_loss(denoise_fn(z, t)[1]["attn"], weights, mask)

    return weights, mask, denoise_fn, loss


@pytest.mark.slow  # make test's budget: refine inside generate is checked there
def test_refine_on_a_converted_unet_lowers_the_subject_loss_and_compiles_once(sd2):
    """The acceptance check: `iterref.refine` under jit on a UNet loaded from a diffusers folder."""
    weights, mask, denoise_fn, loss = subject_setup(sd2, "a cat and a dog", ["cat", "dog"])
    assert weights.shape[1] == 4 and (weights.sum(-1) > 0).sum() == 2 and weights.sum() == pytest.approx(2.0)

    @jax.jit
    def refined(z, t):
        return iterref.refine(denoise_fn, z, t, weights, n_iters=20, lr=0.05, token_mask=mask)

    z = jax.random.normal(jax.random.key(0), (1, 32, 32, 4))
    out = refined(z, 801.0)
    assert float(jnp.abs(out - z).max()) > 1e-3
    assert float(loss(out, 801.0)) < float(loss(z, 801.0))
    refined(jax.random.normal(jax.random.key(1), (1, 32, 32, 4)), 761.0)
    assert refined._cache_size() == 1


def test_iterref_in_the_loop_acts_at_its_step_only_and_one_program_serves_every_step(sd2):
    prompt, words = "a cat and a dog", ["cat", "dog"]
    x = np.random.default_rng(5).standard_normal((1, 32, 32, 4)).astype(np.float32)
    kw = dict(num_inference_steps=5, guidance_scale=5.0, latents=x, decode=False, return_trajectory=True)
    plain = sampling.generate(sd2, prompt, **kw)
    before = len(sampling._PROGRAMS[sd2])
    runs = {k: sampling.generate(sd2, prompt, iterref=iterref.IterRef(step=k, lr=0.05, n_iters=5, subjects=[words]),
                                 **kw) for k in (1, 3)}
    assert len(sampling._PROGRAMS[sd2]) == before + 1  # k is an argument, not a new program
    for k, out in runs.items():
        np.testing.assert_allclose(out["trajectory"][:k], plain["trajectory"][:k], rtol=1e-5, atol=1e-5)
        assert np.abs(out["trajectory"][k] - plain["trajectory"][k]).max() > 1e-3


def test_iterref_refinement_inside_generate_equals_refine(sd2):
    """Step k of the loop refines exactly as `iterref.refine` on the latent before that step does."""
    prompt, words, k = "a cat and a dog", ["cat", "dog"], 2
    weights, mask, denoise_fn, _ = subject_setup(sd2, prompt, words)
    x = np.random.default_rng(6).standard_normal((1, 32, 32, 4)).astype(np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, latents=x, decode=False, return_trajectory=True)
    ir = iterref.IterRef(step=k, lr=0.05, n_iters=4, subjects=[words])
    ours = sampling.generate(sd2, prompt, iterref=ir, **kw)
    plan = samplers.plan("ddim", sd2.scheduler, 4)
    t = plan.timesteps[k]
    # The latent before step k is the plain run's (the test above): refine it as the loop should.
    z = jax.jit(lambda z0: iterref.refine(denoise_fn, z0, t, weights, n_iters=4, lr=0.05, token_mask=mask))(
        ours["trajectory"][k - 1])
    pred, _ = jax.jit(denoise_fn)(z, t)
    expected = samplers.update(plan, z, pred, {n: v[k] for n, v in plan.tables.items()})
    np.testing.assert_allclose(ours["trajectory"][k], expected, rtol=1e-4, atol=1e-4)


def test_iterref_on_sd3_and_with_a_tagger(sd3):
    """MM-DiT maps (all joint blocks); subjects found by a tagger callable; GSN guidance steps."""
    def tagger(prompt):
        return [(w, "NOUN" if w in ("kite", "lake") else "X", prompt.index(w), prompt.index(w) + len(w))
                for w in prompt.split()]

    x = np.random.default_rng(7).standard_normal((1, 32, 32, 16)).astype(np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=4.0, latents=x, decode=False)
    ir = iterref.IterRef(step=1, lr=0.05, n_iters=3, tagger=tagger, gsn_steps=(2, 4), gsn_lr=0.5)
    out = sampling.generate(sd3, "a kite over a lake", iterref=ir, **kw)
    plain = sampling.generate(sd3, "a kite over a lake", **kw)
    assert np.isfinite(out["latents"]).all()
    assert np.abs(out["latents"] - plain["latents"]).max() > 1e-3
    weights, _ = sampling.subject_weights(sd3, ["a kite over a lake"], tagger=tagger)
    assert (weights.sum(-1) > 0).sum() == 2  # kite, lake (rows padded to 4)


def test_iterref_arguments_are_checked(sd2):
    with pytest.raises(ValueError, match="IterRef\\(step=9\\)"):
        sampling.generate(sd2, "a cat", num_inference_steps=3,
                          iterref=iterref.IterRef(step=9, lr=0.1, subjects=[["cat"]]))
    with pytest.raises(ValueError, match="lr=0"):
        iterref.IterRef(step=1, lr=0.0)
    with pytest.raises(ValueError, match="one list per prompt"):
        sampling.generate(sd2, ["a cat", "a dog"], num_inference_steps=3,
                          iterref=iterref.IterRef(step=1, lr=0.1, subjects=[["cat"]]))


def test_a_lora_file_samples_as_its_adapters(sd2, tmp_path):
    """`lora=` a diffusers LoRA file (as the trainer exports it) equals passing the adapters."""
    from conversion import export_lora

    lp = lora.init(jax.random.key(0), sd2.params["unet"], targets=r"attn2\.(to_k|to_v)$", rank=2, alpha=2)
    lp = jax.tree.map(lambda a: a + 0.2 if getattr(a, "ndim", 0) == 2 and a.shape[0] == 2 else a, lp)
    export_lora(tmp_path, {"unet": lp})
    kw = dict(num_inference_steps=2, guidance_scale=3.0, seed=4, decode=False)
    from_file = sampling.generate(sd2, "a lamp", lora=tmp_path, **kw)["latents"]
    from_tree = sampling.generate(sd2, "a lamp", lora={"unet": lp}, **kw)["latents"]
    plain = sampling.generate(sd2, "a lamp", **kw)["latents"]
    np.testing.assert_allclose(from_file, from_tree, rtol=1e-5, atol=1e-5)
    assert np.abs(from_tree - plain).max() > 1e-4
