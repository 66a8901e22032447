"""The CTCAL train step: runs jitted once, teacher gives no gradient, no-noun samples are finite,
accumulation averages micro-batch gradients, loss falls, same loss and update on 1 and 8 devices
(the trainer's own 1-vs-8-device run is `slow`). The SD3 teacher-gradient check is `slow`: the SD3
family's forward runs in `make test` through the other tests."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctcal_jax import ctcal
from ctcal_jax.train_step import loss_fn, make_step_fn
from step_setup import batch, setup


def _device_batch(family="sd2", **kw):
    return jax.tree.map(jnp.asarray, batch(family, **kw))


@pytest.mark.parametrize("family", ["sd2", "sd3"])
def test_step_runs_finite_and_compiles_once(family):
    s = setup(family)
    step, state, b = s.step, s.state, batch(family)
    for _ in range(3):
        state, metrics = step(state, b, jax.random.key(0))
    assert int(state["step"]) == 3
    assert step.jitted._cache_size() == 1
    prefixes = [""] if family == "sd2" else ["clip/", "t5/"]
    names = ["loss", "diffusion", "grad_norm"] + [p + f"ctcal{t}" for p in prefixes
                                                 for t in ("", "_pixel", "_semantic", "_recon", "_balance")]
    for name in names:
        assert np.isfinite(float(metrics[name])), name
    assert float(metrics[prefixes[0] + "ctcal_nouns"]) == 1.25  # (2 + 2 + 0 + 1) / 4: "left" is blacklisted


@pytest.mark.parametrize("family", ["sd2", pytest.param("sd3", marks=pytest.mark.slow)])
def test_teacher_contributes_no_gradient(family):
    s = setup(family)
    state, frozen, family_ = s.state, s.frozen, s.family
    b, rng = _device_batch(family), jax.random.key(3)
    params = state["params"]
    teacher = jax.jit(family_.forward)(frozen, params, b, rng)["teacher_maps"]
    constant = dataclasses.replace(family_, forward=lambda f, p, bb, r: {**family_.forward(f, p, bb, r),
                                                                          "teacher_maps": teacher})
    grads = jax.jit(jax.grad(lambda p: loss_fn(family_, p, frozen, b, rng)[0]))(params)
    grads_const = jax.jit(jax.grad(lambda p: loss_fn(constant, p, frozen, b, rng)[0]))(params)
    # Two compiled programs round differently; a teacher gradient would be of the order of the rest.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4 * scale), grads, grads_const)
    # ... and the gradient reaches every text encoder, the denoiser's LoRA and the autoencoder.
    for part, leaves in grads.items():
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(leaves)) > 0, part


def test_samples_without_nouns_are_finite_and_contribute_zero():
    s = setup()
    state, frozen, family = s.state, s.frozen, s.family
    b = _device_batch()
    none = {**b, "noun_weights": jnp.zeros_like(b["noun_weights"])}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(family, p, frozen, none, jax.random.key(4)), has_aux=True))(state["params"])
    assert float(metrics["ctcal"]) == 0.0 and float(metrics["ctcal_nouns"]) == 0.0
    np.testing.assert_allclose(float(loss), float(metrics["diffusion"]), rtol=1e-6)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    # The autoencoder is trained only by the noun terms: no nouns, no gradient.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["ae"]))


def test_accumulation_averages_micro_batch_gradients():
    s = setup()
    state, frozen, family = s.state, s.frozen, s.family
    b, rng = _device_batch(), jax.random.key(5)
    accumulated = make_step_fn(family, s.optimizer, accum_steps=2)
    # Reference: micro-batch i holds samples i, i+2 and gets the step's key folded with i.
    key = jax.random.fold_in(rng, 0)
    grad = jax.jit(jax.grad(lambda p, mb, r: loss_fn(family, p, frozen, mb, r)[0]))
    grads = [grad(state["params"], jax.tree.map(lambda x: x[i::2], b), jax.random.fold_in(key, i)) for i in range(2)]
    mean = jax.tree.map(lambda g, h: (g + h) / 2, *grads)
    _, metrics = jax.jit(accumulated)(frozen, state, b, rng)
    ref_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(mean))))
    np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=1e-4)


@pytest.mark.slow  # make test's budget: the trainer's runs train there
def test_tiny_model_fits_one_batch():
    s = setup()
    step, state, frozen, family, b = s.step, s.state, s.frozen, s.family, batch()
    probe = jax.jit(lambda p: loss_fn(family, p, frozen, jax.tree.map(jnp.asarray, b), jax.random.key(7))[0])
    before = float(probe(state["params"]))
    for _ in range(25):
        state, _ = step(state, b, jax.random.key(8))
    after = float(probe(state["params"]))
    assert after < 0.95 * before, (before, after)


def test_sd3_default_teacher_is_fixed_on_the_host_and_jits():
    """SPEC §3: with no configured value the SD3 teacher is argmax_k p_k / t_k (570.6 at shift 3),
    computed before tracing; the jitted forward then runs with it."""
    s = setup("sd3", config=ctcal.default_config("sd3"))
    assert s.family.ctcal.teacher_t == pytest.approx(ctcal.teacher_timestep("logit_normal", shift=3.0))
    assert 560.0 < s.family.ctcal.teacher_t < 580.0
    out = jax.jit(s.family.forward)(s.frozen, s.state["params"], _device_batch("sd3"), jax.random.key(0))
    np.testing.assert_allclose(out["t_tea"], s.family.ctcal.teacher_t, rtol=1e-6)


@pytest.mark.slow  # make test's budget: bf16 compute is checked there per model (test_unet, test_lora's bf16 weights)
def test_bf16_compute_with_float32_weights_and_state():
    b, rng = _device_batch(), jax.random.key(9)
    ref = setup()
    loss32, _ = jax.jit(lambda p: loss_fn(ref.family, p, ref.frozen, b, rng))(ref.state["params"])
    s = setup(compute_dtype=jnp.bfloat16)
    loss16, _ = jax.jit(lambda p: loss_fn(s.family, p, s.frozen, b, rng))(s.state["params"])
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=5e-2)
    state, metrics = s.step(s.state, batch(), rng)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))


_EIGHT_DEVICES = """
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from step_setup import batch, setup
assert jax.device_count() == 8
out = {{}}
for name, (data, fsdp, devices) in {{"one": (1, 1, jax.devices()[:1]), "eight": (4, 2, None)}}.items():
    s = setup("sd2", data, fsdp, devices=devices)
    state, metrics = s.step(s.state, batch("sd2", batch_size=8), jax.random.key(0))
    out[name] = {{"metrics": {{k: float(v) for k, v in metrics.items()}},
                 "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state["params"]["ae"])][:2]}}
print(json.dumps(out))
"""


@pytest.mark.slow  # make test's budget: the 8-device step compiles there (compile check)
def test_same_loss_and_update_on_one_and_eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    tests = str(Path(__file__).parent)
    script = _EIGHT_DEVICES.format(tests=tests)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(Path(tests).parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = out["one"], out["eight"]
    for k, v in one["metrics"].items():
        np.testing.assert_allclose(eight["metrics"][k], v, rtol=1e-4, err_msg=k)
    for a, b in zip(one["params"], eight["params"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
