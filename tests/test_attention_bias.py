"""`attention` with an additive bias (T5) and a causal mask (CLIP): fused and explicit paths against
a NumPy softmax written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctcal_jax.attention import attention


def _reference(q, k, v, scale, bias=None, causal=False):
    logits = np.einsum("blnd,bsnd->bnls", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if causal:
        length = logits.shape[-1]
        logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnls,bsnd->blnd", probs, v)


@pytest.fixture
def qkv():
    rng = np.random.RandomState(0)
    return [rng.randn(2, 6, 3, 4).astype(np.float32) for _ in range(3)]


@pytest.mark.parametrize("implementation", ["fused", "explicit"])
def test_causal(qkv, implementation):
    q, k, v = qkv
    out, _ = attention(*map(jnp.asarray, qkv), is_causal=True, implementation=implementation)
    np.testing.assert_allclose(out, _reference(q, k, v, 0.5, causal=True), rtol=1e-5, atol=1e-6)
    # The first query sees only the first key: its output is that key's value.
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)


@pytest.mark.parametrize("implementation", ["fused", "explicit"])
def test_bias(qkv, implementation):
    q, k, v = qkv
    bias = np.random.RandomState(1).randn(1, 3, 6, 6).astype(np.float32)
    out, _ = attention(*map(jnp.asarray, qkv), scale=1.0, bias=jnp.asarray(bias), implementation=implementation)
    np.testing.assert_allclose(out, _reference(q, k, v, 1.0, bias=bias), rtol=1e-5, atol=1e-6)


def test_bias_and_causal_refuse_capture(qkv):
    with pytest.raises(ValueError, match="capture"):
        attention(*map(jnp.asarray, qkv), is_causal=True, capture=True)


def test_causal_gradients_match(qkv):
    """The explicit path's masked logits give the fused path's gradients (no NaN from the mask)."""
    def loss(q, impl):
        return attention(q, *map(jnp.asarray, qkv[1:]), is_causal=True, implementation=impl)[0].sum()

    g_fused = jax.grad(loss)(jnp.asarray(qkv[0]), "fused")
    g_explicit = jax.grad(loss)(jnp.asarray(qkv[0]), "explicit")
    assert np.isfinite(g_explicit).all()
    np.testing.assert_allclose(g_fused, g_explicit, rtol=1e-4, atol=1e-6)
