"""The attention function against hand-written numpy softmax: maps, TACA, fused vs explicit."""

import jax
import numpy as np
import pytest

from ctcal_jax.attention import TACA, attention, joint_attention


def _qkv(seed, b=2, lq=6, s=6, n=3, d=8):
    rng = np.random.RandomState(seed)
    return [rng.randn(b, length, n, d).astype(np.float32) for length in (lq, s, s)]


def _softmax_attention(q, k, v, mult=None):
    """numpy reference: returns out [B, L, N, D] and probs [B, N, L, S]."""
    logits = np.einsum("blnd,bsnd->bnls", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(q.shape[-1])
    if mult is not None:
        logits = logits * mult
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnls,bsnd->blnd", probs, v), probs


@pytest.mark.parametrize("implementation", ["fused", "explicit"])
def test_attention_maps_are_head_mean_probabilities(implementation):
    q, k, v = _qkv(0, lq=10, s=5)
    out, maps = attention(q, k, v, capture=True, implementation=implementation)
    ref_out, probs = _softmax_attention(q, k, v)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps, probs.mean(axis=1), rtol=1e-5, atol=1e-6)
    assert attention(q, k, v)[1] is None


@pytest.mark.parametrize("implementation", ["fused", "explicit"])
@pytest.mark.parametrize("text_first", [True, False])
def test_joint_attention_taca_matches_explicit_formula(implementation, text_first):
    n_img, n_txt = 7, 4
    q, k, v = _qkv(1, lq=n_img + n_txt, s=n_img + n_txt)
    gamma = np.array([1.0, 1.7], np.float32)  # per sample: one plain, one scaled
    start = 0 if text_first else n_img
    is_txt = np.zeros(n_img + n_txt, bool)
    is_txt[start:start + n_txt] = True
    block = (~is_txt)[:, None] & is_txt[None, :]  # image queries × text keys
    mult = 1.0 + (gamma[:, None, None, None] - 1.0) * block
    ref_out, probs = _softmax_attention(q, k, v, mult)
    out, maps = joint_attention(q, k, v, text_start=start, text_len=n_txt, gamma=gamma, capture=True,
                                implementation=implementation)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    ref_maps = probs[:, :, ~is_txt][:, :, :, is_txt].mean(axis=1)
    assert maps.shape == (2, n_img, n_txt)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
    # The image rows are normalised over all keys: their text block sums to less than one.
    assert float(maps.sum(-1).max()) < 1.0


def test_gamma_one_equals_plain_attention():
    q, k, v = _qkv(2, lq=9, s=9)
    plain, maps_plain = joint_attention(q, k, v, text_start=6, text_len=3, capture=True)
    taca, maps_taca = joint_attention(q, k, v, text_start=6, text_len=3, gamma=np.ones(2, np.float32), capture=True)
    np.testing.assert_allclose(taca, plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(maps_taca, maps_plain, rtol=1e-6, atol=1e-7)


def test_joint_attention_rejects_text_in_the_middle():
    q, k, v = _qkv(3, lq=9, s=9)
    with pytest.raises(ValueError, match="start or the end"):
        joint_attention(q, k, v, text_start=2, text_len=3)


def test_taca_schedule_is_per_sample_and_jittable():
    taca = TACA(gamma=1.2, t_threshold=970.0)
    scales = jax.jit(taca.scales)(np.array([0.0, 969.9, 970.0, 1000.0]))
    np.testing.assert_allclose(scales, [1.0, 1.0, 1.2, 1.2], rtol=1e-7)


def _grads(fn, q, k, v):
    """Gradients of a scalar mixing the output and the maps, w.r.t. q, k, v."""
    rng = np.random.RandomState(7)

    def scalar(q, k, v):
        out, maps = fn(q, k, v)
        w_out = rng.randn(*out.shape).astype(np.float32)
        w_maps = rng.randn(*maps.shape).astype(np.float32)
        return (out * w_out).sum() + 10.0 * (maps * w_maps).sum()

    rng_state = rng.get_state()

    def reset_and_run(*args):
        rng.set_state(rng_state)
        return scalar(*args)

    return jax.grad(reset_and_run, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("case", ["cross", "joint_text_last", "joint_text_first", "taca"])
def test_fused_map_gradients_equal_explicit(case):
    """The kernel's log-sum-exp carries no gradient; the maps' custom backward must restore it."""
    if case == "cross":
        q, k, v = _qkv(4, lq=10, s=5)

        def fn(impl):
            return lambda q, k, v: attention(q, k, v, capture=True, implementation=impl)
    else:
        q, k, v = _qkv(5, lq=11, s=11)
        start = 0 if case == "joint_text_first" else 7
        gamma = np.array([1.0, 1.6], np.float32) if case == "taca" else None

        def fn(impl):
            return lambda q, k, v: joint_attention(q, k, v, text_start=start, text_len=4, gamma=gamma,
                                                   capture=True, implementation=impl)
    fused = _grads(fn("fused"), q, k, v)
    explicit = _grads(fn("explicit"), q, k, v)
    for a, b in zip(fused, explicit):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
