"""The attention function against hand-written numpy softmax: maps, TACA, fused vs explicit."""

import jax
import jax.numpy as jnp
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


def _mixed_scalar(fn, seed=11):
    """`fn(*args) -> (out, maps)` to a scalar with fixed random weights on both parts."""
    def scalar(*args):
        out, maps = fn(*args)
        rng = np.random.RandomState(seed)
        w_out = rng.randn(*out.shape).astype(np.float32)
        w_maps = rng.randn(*maps.shape).astype(np.float32) if maps is not None else 0.0
        return (out.astype(jnp.float32) * w_out).sum() + 10.0 * ((maps * w_maps).sum() if maps is not None else 0.0)
    return scalar


def _grads(fn, q, k, v):
    """Gradients of a scalar mixing the output and the maps, w.r.t. q, k, v."""
    return jax.grad(_mixed_scalar(fn, seed=7), argnums=(0, 1, 2))(q, k, v)


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


def _autodiff_reference(q, k, v, mult=None, bias=None, causal=False, block=None):
    """The explicit formula in plain jnp, differentiated by JAX: (out, head-mean maps of `block`)."""
    logits = jnp.einsum("blnd,bsnd->bnls", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if mult is not None:
        logits = logits * mult
    if bias is not None:
        logits = logits + bias
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnls,bsnd->blnd", probs, v.astype(jnp.float32))
    (r0, r1), (c0, c1) = block or ((0, 0), (0, 0))
    return out, probs[:, :, r0:r1, c0:c1].mean(axis=1)


@pytest.mark.parametrize("case", ["cross", "cross_no_maps", "taca_text_last", "taca_text_first",
                                  "bias_per_head", "bias_per_key", "causal"])
def test_explicit_backward_equals_autodiff(case):
    """The explicit path's written-out backward (recomputed probabilities, rowsum(dO·O)) against
    JAX's autodiff of the same formula: q, k, v and the gradients of TACA's γ and of a bias."""
    n_img, n_txt = 7, 4
    q, k, v = (jnp.asarray(x) for x in _qkv(12, lq=n_img + n_txt, s=n_img + n_txt if case != "cross" else 5))
    extra = ()
    if case in ("cross", "cross_no_maps"):
        capture = case == "cross"

        def ours(q, k, v):
            return attention(q, k, v, capture=capture, implementation="explicit")

        def ref(q, k, v):
            out, maps = _autodiff_reference(q, k, v, block=((0, q.shape[1]), (0, k.shape[1])))
            return out, maps if capture else None
    elif case.startswith("taca"):
        start = 0 if case == "taca_text_first" else n_img
        is_txt = np.zeros(n_img + n_txt, bool)
        is_txt[start:start + n_txt] = True
        img = (n_txt, n_img + n_txt) if start == 0 else (0, n_img)
        extra = (jnp.array([1.0, 1.7], jnp.float32),)

        def ours(q, k, v, gamma):
            return joint_attention(q, k, v, text_start=start, text_len=n_txt, gamma=gamma, capture=True,
                                   implementation="explicit")

        def ref(q, k, v, gamma):
            mult = 1.0 + (gamma[:, None, None, None] - 1.0) * ((~is_txt)[:, None] & is_txt[None, :])
            return _autodiff_reference(q, k, v, mult=mult, block=(img, (start, start + n_txt)))
    else:
        shape = {"bias_per_head": (1, 3, 11, 11), "bias_per_key": (2, 1, 1, 11), "causal": None}[case]
        causal = case == "causal"
        extra = (jnp.asarray(np.random.RandomState(13).randn(*shape).astype(np.float32)),) if shape else ()

        def ours(q, k, v, *bias):
            return attention(q, k, v, bias=bias[0] if bias else None, is_causal=causal, implementation="explicit")

        def ref(q, k, v, *bias):
            return _autodiff_reference(q, k, v, bias=bias[0] if bias else None, causal=causal)[0], None
    argnums = tuple(range(3 + len(extra)))
    got = jax.grad(_mixed_scalar(ours), argnums)(q, k, v, *extra)
    want = jax.grad(_mixed_scalar(ref), argnums)(q, k, v, *extra)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_explicit_backward_bf16_close_to_float32():
    """bf16 inputs: the written-out backward returns bf16 gradients within bf16 rounding of fp32's."""
    q, k, v = (jnp.asarray(x) for x in _qkv(14, lq=12, s=12, d=16))
    loss = _mixed_scalar(lambda q, k, v: attention(q, k, v, capture=True, implementation="explicit"))
    g32 = jax.grad(loss, (0, 1, 2))(q, k, v)
    g16 = jax.grad(loss, (0, 1, 2))(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0, atol=2e-2 * float(np.abs(b).max()))
