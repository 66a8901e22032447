"""CTCAL formulas (SPEC §3) against hand-computed values and independent numpy/torch references:
every λ term, τ, λ_t, GORS, the autoencoder, the teacher timestep, no-noun samples and where
gradients flow. The map processing of SPEC §2 is tested in test_maps.py."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

import jax
import jax.numpy as jnp

from ctcal_jax import ctcal
from tests.map_refs import np_group, np_minmax, np_smooth, np_softmax_masked

terms_jit = jax.jit(ctcal.ctcal_terms, static_argnames="config")

# --- torch reference -------------------------------------------------------------------------------


def torch_autoencoder(params, x_nhwc):
    """The architecture of SPEC §3 written with torch ops: returns (codes NHWC, reconstruction NHWC)."""
    def conv(name, x, stride):
        kernel = torch.from_numpy(np.array(params[name]["kernel"])).permute(3, 2, 0, 1)
        return F.conv2d(x, kernel, torch.from_numpy(np.array(params[name]["bias"])), stride=stride, padding=1)

    stages = sum(name.startswith("encoder") for name in params)
    x = torch.from_numpy(np.asarray(x_nhwc)).permute(0, 3, 1, 2)
    for i in range(stages):
        x = conv(f"encoder_{i}", x if i == 0 else F.gelu(x), 2)
    code = x
    for i in range(stages):
        x = conv(f"decoder_{i}", F.interpolate(x if i == 0 else F.gelu(x), scale_factor=2, mode="nearest"), 1)
    return code.permute(0, 2, 3, 1).numpy(), torch.sigmoid(x).permute(0, 2, 3, 1).numpy()


# --- autoencoder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,stages", [(16, 2), (64, 4)])
def test_autoencoder_architecture(size, stages):
    params = ctcal.init_autoencoder(jax.random.key(0), size)
    assert sorted(params) == sorted([f"encoder_{i}" for i in range(stages)] + [f"decoder_{i}" for i in range(stages)])
    x = np.random.default_rng(1).random((3, size, size, 1)).astype(np.float32)
    ae = ctcal.MapAutoencoder(size)
    code = np.asarray(ae.apply({"params": params}, jnp.asarray(x), method="encode"))
    recon = np.asarray(ae.apply({"params": params}, jnp.asarray(code), method="decode"))
    assert code.shape == (3, 4, 4, 16) and recon.shape == x.shape
    code_ref, recon_ref = torch_autoencoder(params, x)
    np.testing.assert_allclose(code, code_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(recon, recon_ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="map_size"):
        ctcal.init_autoencoder(jax.random.key(0), 24)


# --- loss terms ------------------------------------------------------------------------------------------

B, R, T = 2, 16, 6


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    student = rng.dirichlet(np.ones(T), size=(B, R, R)).astype(np.float32)
    teacher = rng.dirichlet(np.ones(T), size=(B, R, R)).astype(np.float32)
    w = np.zeros((B, 3, T), np.float32)
    w[0, 0, 1] = 1.0  # sample 0: a one-token noun and a two-token noun; slot 2 is padding
    w[0, 1, 2:4] = 0.5
    w[1, 0, 2] = 1.0  # sample 1: one noun
    mask = np.zeros((B, T), bool)
    mask[0, 1:5] = True
    mask[1, 1:4] = True
    params = ctcal.init_autoencoder(jax.random.key(0), R)
    return student, teacher, w, mask, params


def reference_terms(student, teacher, w, mask, params, cfg):
    """The terms of SPEC §3 from numpy map processing and the torch autoencoder."""
    a_s = np_minmax(np_smooth(np_group(student, w), cfg.kernel_size, cfg.sigma))
    a_t = np_minmax(np_smooth(np_group(teacher, w), cfg.kernel_size, cfg.sigma))
    valid = w.sum(-1) > 0
    count = valid.sum(-1)
    pixel = ((a_s - a_t) ** 2).mean(axis=(1, 2))

    def flat(m):
        return m.transpose(0, 3, 1, 2).reshape(-1, R, R, 1).astype(np.float32)

    code_s, _ = torch_autoencoder(params, flat(a_s))
    code_t, recon_t = torch_autoencoder(params, flat(a_t))
    semantic = ((code_s - code_t) ** 2).reshape(B, 3, -1).mean(-1)
    recon = ((recon_t - flat(a_t)) ** 2).reshape(B, 3, -1).mean(-1)
    hat = np_smooth(np_group(np_softmax_masked(student, mask, cfg.reweight_scale), w), cfg.kernel_size, cfg.sigma)
    peaks = hat.max(axis=(1, 2))
    top = np.where(valid, peaks, -np.inf).max(-1, keepdims=True)
    balance = np.maximum(top - peaks - cfg.tau, 0)

    def mean(d):
        return np.where(valid, d, 0).sum(-1) / count

    return {"pixel": mean(pixel), "semantic": mean(semantic), "recon": mean(recon), "balance": mean(balance)}


def test_terms_match_reference(batch):
    student, teacher, w, mask, params = batch
    cfg = ctcal.CTCALConfig(lambdas=(0.3, 0.7, 1.1, 1.9), tau=0.05)
    loss, terms = terms_jit(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(w), jnp.asarray(mask),
                                    params, cfg)
    ref = reference_terms(student, teacher, w, mask, params, cfg)
    for k, v in ref.items():
        np.testing.assert_allclose(np.asarray(terms[k]), v, rtol=1e-4, atol=1e-7, err_msg=k)
    assert ref["balance"][0] > 0  # τ = 0.05 leaves a non-zero balance term to check
    np.testing.assert_array_equal(np.asarray(terms["nouns"]), [2, 1])
    expected = 0.3 * ref["pixel"] + 0.7 * ref["semantic"] + 1.1 * ref["recon"] + 1.9 * ref["balance"]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-4)


def test_balance_and_tau_hand_values():
    # Tokens [SOT, noun 1, noun 2, EOT]; identity smoothing (kernel 1). Pixel (0, 0) favours noun 1 by
    # 0.05, so Â_1 peaks at e⁵/(1+e⁵) and Â_2 at 1/2 (the other pixels split evenly).
    a = np.zeros((1, 4, 4, 4), np.float32)
    a[0, 0, 0, 1] = 0.05
    w = np.zeros((1, 2, 4), np.float32)
    w[0, 0, 1] = w[0, 1, 2] = 1.0
    mask = np.array([[0, 1, 1, 0]], bool)
    peak = np.exp(5) / (1 + np.exp(5))
    for tau, expected in [(0.2, (peak - 0.5 - 0.2) / 2), (0.5, 0.0)]:
        cfg = ctcal.CTCALConfig(lambdas=(0, 0, 0, 1), tau=tau, kernel_size=1, semantic=False)
        loss, terms = terms_jit(jnp.asarray(a), jnp.asarray(a), jnp.asarray(w), jnp.asarray(mask), None, cfg)
        np.testing.assert_allclose(np.asarray(terms["balance"]), [expected], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(loss), [expected], rtol=1e-5, atol=1e-7)


def test_pixel_hand_values():
    # Identity smoothing; student noun map [[0, 1], [0, 0]] after min-max, teacher [[0, 0], [1, 0]]:
    # the MSE over 4 pixels is 2/4.
    s = np.zeros((1, 2, 2, 2), np.float32)
    t = np.zeros((1, 2, 2, 2), np.float32)
    s[0, 0, 1, 1] = 0.4
    t[0, 1, 0, 1] = 0.9
    w = np.array([[[0, 1]]], np.float32)
    cfg = ctcal.CTCALConfig(lambdas=(0.01, 0, 0, 0), kernel_size=1, semantic=False, regularizer=False)
    loss, terms = terms_jit(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), jnp.ones((1, 2), bool), None, cfg)
    np.testing.assert_allclose(np.asarray(terms["pixel"]), [0.5])
    np.testing.assert_allclose(np.asarray(loss), [0.005])
    assert set(terms) == {"pixel", "nouns"}


def test_all_tokens_switch(batch):
    student, teacher, _, mask, params = batch
    cfg = ctcal.CTCALConfig(tokens="all")
    args = (jnp.asarray(student), jnp.asarray(teacher))
    loss_all, _ = terms_jit(*args, jnp.zeros((B, 3, T)), jnp.asarray(mask), params, cfg)
    one_hot = np.asarray(ctcal.all_token_weights(jnp.asarray(mask)))
    loss_ref, terms = terms_jit(*args, jnp.asarray(one_hot), jnp.asarray(mask), params,
                                        dataclasses.replace(cfg, tokens="nouns"))
    np.testing.assert_allclose(np.asarray(loss_all), np.asarray(loss_ref), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(terms["nouns"]), [4, 3])


def test_lambda_t_gors_and_scalar_loss(batch):
    student, teacher, w, mask, params = batch
    cfg = ctcal.default_config("sd2")
    t = jnp.asarray([250, 1000])
    np.testing.assert_allclose(np.asarray(ctcal.adaptive_weight(t, cfg)), [0.25, 1.0])
    np.testing.assert_allclose(np.asarray(ctcal.adaptive_weight(t, dataclasses.replace(cfg, adaptive_weight=False))),
                               [1.0, 1.0])
    args = (jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(w), jnp.asarray(mask), params)
    per_sample, _ = terms_jit(*args, cfg)
    loss, metrics = ctcal.ctcal_loss(*args, t, cfg)
    np.testing.assert_allclose(float(loss), float((0.25 * per_sample[0] + per_sample[1]) / 2), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ctcal"]), float(per_sample.mean()), rtol=1e-6)
    assert {"ctcal_pixel", "ctcal_semantic", "ctcal_recon", "ctcal_balance", "ctcal_nouns", "ctcal_weighted"} <= set(metrics)
    np.testing.assert_allclose(float(ctcal.gors_weighted_mean(jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, 1.0]))), 1.25)
    np.testing.assert_allclose(float(ctcal.gors_weighted_mean(jnp.asarray([1.0, 2.0]))), 1.5)


def test_default_configs():
    sd2, sd3 = ctcal.default_config("sd2"), ctcal.default_config("sd3")
    assert sd2.lambdas == (0.01, 1.0, 0.01, 0.1) and sd3.lambdas == (0.01, 1.0, 0.01, 0.0)
    assert sd2.tau == sd3.tau == 0.2 and (sd2.kernel_size, sd3.kernel_size) == (3, 5)
    assert sd2.sigma == sd3.sigma == 0.5 and sd2.reweight_scale == 100.0
    hash(sd2)  # a static jit argument


# --- gradients and no-noun samples ---------------------------------------------------------------------


def _loss_fn(cfg):
    @jax.jit
    def grads(student, teacher, w, mask, params, t):
        def f(student, teacher, params):
            return ctcal.ctcal_loss(student, teacher, w, mask, params, t, cfg)[0]
        return f(student, teacher, params), jax.grad(f, argnums=(0, 1, 2))(student, teacher, params)
    return grads


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def test_no_noun_samples_give_zero_and_finite_grads(batch):
    student, teacher, w, mask, params = batch
    w = w.copy()
    w[1] = 0.0  # sample 1 has no noun
    const = np.full_like(student, 1.0 / T)  # constant maps: min-max 0/0
    cfg = ctcal.default_config("sd2")
    per_sample, terms = terms_jit(jnp.asarray(const), jnp.asarray(const), jnp.asarray(w), jnp.asarray(mask),
                                          params, cfg)
    assert float(per_sample[1]) == 0.0 and all(float(v[1]) == 0.0 for v in terms.values())
    grads = _loss_fn(cfg)
    for s, wts in [(student, w), (const, w), (student, np.zeros_like(w))]:
        loss, g = grads(jnp.asarray(s), jnp.asarray(teacher), jnp.asarray(wts), jnp.asarray(mask), params,
                        jnp.asarray([500, 900]))
        assert np.isfinite(float(loss)) and _finite(g)
    assert float(loss) == 0.0  # the all-empty batch


def test_gradient_flow(batch):
    student, teacher, w, mask, params = batch
    cfg = ctcal.default_config("sd2")

    @jax.jit
    def grads(student, teacher, params):
        def term(name):
            def f(s, t, p):
                if name == "loss":
                    return ctcal.ctcal_loss(s, t, jnp.asarray(w), jnp.asarray(mask), p, jnp.asarray([500, 900]), cfg)[0]
                return ctcal.ctcal_terms(s, t, jnp.asarray(w), jnp.asarray(mask), p, cfg)[1][name].sum()
            return jax.grad(f, argnums=(0, 1, 2))(student, teacher, params)
        return {name: term(name) for name in ("semantic", "recon", "loss")}

    def size(tree, prefix=""):
        return sum(float(jnp.abs(x).sum()) for path, x in jax.tree_util.tree_leaves_with_path(tree)
                   if jax.tree_util.keystr(path).startswith(prefix))

    g = grads(jnp.asarray(student), jnp.asarray(teacher), params)
    stu, tea, ae = g["semantic"]  # λ2: the encoder, through both maps
    assert size(stu) > 0 and size(tea) == 0 and size(ae, "['encoder") > 0 and size(ae, "['decoder") == 0
    stu, tea, ae = g["recon"]  # λ3: encoder and decoder; the teacher map is a constant
    assert size(stu) == 0 and size(tea) == 0 and size(ae, "['encoder") > 0 and size(ae, "['decoder") > 0
    stu, tea, ae = g["loss"]
    assert size(stu) > 0 and size(tea) == 0 and size(ae, "['encoder") > 0 and size(ae, "['decoder") > 0


# --- teacher timestep -----------------------------------------------------------------------------------


def quadrature_probs(n, mean, std):
    """p_k by Gauss-Legendre integration of the logit-normal density over [k/n, (k+1)/n]."""
    x, wq = np.polynomial.legendre.leggauss(40)
    lo = np.arange(n)[:, None] / n
    u = lo + (x[None] + 1) / (2 * n)
    density = np.exp(-0.5 * ((np.log(u / (1 - u)) - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi) * u * (1 - u))
    return (density * wq[None]).sum(1) / (2 * n)


@pytest.mark.parametrize("shift,mean,std", [(1.0, 0.0, 1.0), (3.0, 0.0, 1.0), (3.0, 0.5, 0.8)])
def test_teacher_timestep_logit_normal(shift, mean, std):
    ours = ctcal.teacher_timestep("logit_normal", shift=shift, mean=mean, std=std, num_train_timesteps=1000)
    timesteps = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).timesteps.numpy().astype(np.float64)
    # Exact argmax from an independent evaluation of p_k.
    k_star = int(np.argmax(quadrature_probs(1000, mean, std) / timesteps))
    assert ours == float(timesteps[k_star])
    # Monte Carlo with diffusers' own sampler: the priority is flat near its maximum, so compare
    # 25-index bins; the estimated best bin must lie next to ours.
    u = compute_density_for_timestep_sampling("logit_normal", 4_000_000, logit_mean=mean, logit_std=std,
                                              generator=torch.Generator().manual_seed(0))
    counts = np.bincount((u * 1000).long().numpy(), minlength=1000)
    priority = (counts / counts.sum() / timesteps).reshape(40, 25).sum(1)
    assert abs(int(np.argmax(priority)) - k_star // 25) <= 2


def test_teacher_timestep_values():
    assert ctcal.teacher_timestep("uniform") == 0
    # shift 1: t_k = 1000 − k, so the priority is p_k / (1000 − k); shift 3 moves it to larger t.
    t1 = ctcal.teacher_timestep("logit_normal", shift=1.0)
    t3 = ctcal.teacher_timestep("logit_normal", shift=3.0)
    assert t1 == 197.0 and 560 < t3 < 580
    with pytest.raises(ValueError):
        ctcal.teacher_timestep("cosine")


def test_teacher_timesteps_modes():
    t_stu = jnp.asarray([0, 1, 10, 999])
    cfg = ctcal.default_config("sd2")
    fixed = ctcal.teacher_timesteps(jax.random.key(0), t_stu, cfg)
    assert fixed.dtype == jnp.int32 and np.all(np.asarray(fixed) == 0)
    over = ctcal.teacher_timesteps(jax.random.key(0), jnp.asarray([600.0]), dataclasses.replace(cfg, teacher_t=42.0),
                                   sampler="logit_normal")
    assert over.dtype == jnp.float32 and float(over[0]) == 42.0
    flow = ctcal.teacher_timesteps(jax.random.key(0), jnp.asarray([600.0, 900.0]), ctcal.default_config("sd3"),
                                   sampler="logit_normal", shift=3.0)
    np.testing.assert_allclose(np.asarray(flow), ctcal.teacher_timestep("logit_normal", shift=3.0))

    below = dataclasses.replace(cfg, teacher="below")
    t_stu = jnp.full((100_000,), 10)
    draws = np.asarray(ctcal.teacher_timesteps(jax.random.key(1), t_stu, below))
    assert draws.dtype == np.int32
    np.testing.assert_allclose(np.bincount(draws, minlength=10) / draws.size, 0.1, atol=0.005)  # U{0..9}
    assert int(ctcal.teacher_timesteps(jax.random.key(1), jnp.asarray([0]), below)[0]) == 0
    cont = np.asarray(ctcal.teacher_timesteps(jax.random.key(2), jnp.full((100_000,), 800.0), below,
                                              sampler="logit_normal"))
    assert cont.dtype == np.float32 and cont.min() >= 0 and cont.max() < 800
    np.testing.assert_allclose(cont.mean(), 400, rtol=0.01)


def test_priority_teacher_timesteps_trace_under_jit():
    """The fixed teacher is computed on the host even while a step is traced (no config value)."""
    config = ctcal.default_config("sd3")
    t = jax.jit(lambda r, s: ctcal.teacher_timesteps(r, s, config, "logit_normal", 3.0))(
        jax.random.key(0), jnp.array([800.0, 100.0]))
    np.testing.assert_allclose(t, ctcal.teacher_timestep("logit_normal", shift=3.0), rtol=1e-6)
