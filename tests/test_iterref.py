"""IterRef losses (SPEC §6) against hand-computed values and a numpy re-implementation of the map
processing (SPEC §2); finite-difference gradients; `refine` on a toy differentiable denoiser."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ctcal_jax import iterref, nouns
from tests.map_refs import np_group, np_smooth, np_softmax_masked


def square(size, top, left, side, value=1.0):
    m = np.zeros((size, size), np.float32)
    m[top:top + side, left:left + side] = value
    return m


# --- L_CN and L_IoU on hand-made processed maps -----------------------------------------------------


def test_cn_hand_values():
    a = np.stack([square(3, 0, 0, 1, 0.7), square(3, 1, 1, 2, 0.4)])
    assert float(iterref.cn_loss(jnp.asarray(a))) == pytest.approx(0.6)  # max(1 − 0.7, 1 − 0.4)
    assert float(iterref.cn_loss(jnp.asarray(a), jnp.asarray([True, False]))) == pytest.approx(0.3)
    assert float(iterref.cn_loss(jnp.asarray(a * 3))) == 0.0  # peaks above 1 clip at 0
    assert float(iterref.cn_loss(jnp.zeros((0, 3, 3)))) == 0.0
    assert float(iterref.cn_loss(jnp.asarray(a), jnp.zeros(2, bool))) == 0.0


def test_iou_hand_values():
    disjoint = np.stack([square(4, 0, 0, 2), square(4, 2, 2, 2)])
    assert float(iterref.iou_loss(jnp.asarray(disjoint))) == 0.0
    same = np.stack([square(4, 1, 1, 2, 0.3)] * 2)
    assert float(iterref.iou_loss(jnp.asarray(same))) == pytest.approx(0.5)  # Σ A / Σ 2A
    # 2×2 of ones at columns 0–1 and 2×2 of 0.5 at columns 1–2: overlap 2 px × 0.5 = 1, total 4 + 2.
    shifted = np.stack([square(4, 0, 0, 2), square(4, 0, 1, 2, 0.5)])
    assert float(iterref.iou_loss(jnp.asarray(shifted))) == pytest.approx(1 / 6)
    # Three subjects, the third a copy of the second: pairs (0, 1) = (0, 2) = 1/6, (1, 2) = 1/2.
    three = np.stack([square(4, 0, 0, 2), square(4, 0, 1, 2, 0.5), square(4, 0, 1, 2, 0.5)])
    assert float(iterref.iou_loss(jnp.asarray(three))) == pytest.approx((1 / 6 + 1 / 6 + 1 / 2) / 3)
    # A padded subject is left out of the pairs.
    assert float(iterref.iou_loss(jnp.asarray(three), jnp.asarray([True, True, False]))) == pytest.approx(1 / 6)


def test_iou_fewer_than_two_subjects_is_zero():
    assert float(iterref.iou_loss(jnp.ones((1, 4, 4)))) == 0.0
    assert float(iterref.iou_loss(jnp.zeros((0, 4, 4)))) == 0.0
    assert float(iterref.iou_loss(jnp.ones((2, 4, 4)), jnp.asarray([True, False]))) == 0.0
    g = jax.grad(lambda m: iterref.iou_loss(m))(jnp.ones((1, 4, 4)))
    assert np.all(np.asarray(g) == 0)


# --- subject_loss against numpy --------------------------------------------------------------------


def np_subject_maps(maps, groups, mask, k=3, sigma=0.5, scale=100.0):
    """SPEC §2 step by step in numpy: `[H, W, T]` -> `[G, H, W]`."""
    weighted = np_softmax_masked(maps[None].astype(np.float64), mask[None], scale)
    grouped = np_group(weighted, nouns.group_weights(groups, len(groups), maps.shape[-1])[None])
    return np_smooth(grouped, k, sigma)[0].transpose(2, 0, 1)


def np_losses(a):
    cn = max(max(0.0, 1 - m.max()) for m in a)
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    iou = np.mean([np.minimum(a[i], a[j]).sum() / (a[i] + a[j]).sum() for i, j in pairs]) if pairs else 0.0
    return {"cn": cn, "iou": iou, "cn+iou": (cn + iou) / 2}


@pytest.fixture
def raw_maps():
    """`[16, 16, 8]`: SOT, five prompt tokens, EOT, padding; rows sum to 1 like attention."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 16, 8)) * 2
    return (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("loss", iterref.LOSSES)
def test_subject_loss_matches_numpy(raw_maps, loss):
    groups = [[1], [2, 3], [5]]
    mask = np.array([0, 1, 1, 1, 1, 1, 0, 0], bool)
    want = np_losses(np_subject_maps(raw_maps, groups, mask))[loss]
    got = iterref.subject_loss(jnp.asarray(raw_maps), groups, loss, token_mask=jnp.asarray(mask))
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)
    # The same subjects as a padded `[G, T]` weight array, under jit.
    weights = jnp.asarray(nouns.group_weights(groups, 5, 8))
    jitted = jax.jit(functools.partial(iterref.subject_loss, loss=loss))
    assert float(jitted(jnp.asarray(raw_maps), weights, token_mask=jnp.asarray(mask))) == pytest.approx(
        want, rel=1e-5, abs=1e-6)
    # k = 5 (SD3) smoothing.
    want5 = np_losses(np_subject_maps(raw_maps, groups, mask, k=5))[loss]
    got5 = iterref.subject_loss(jnp.asarray(raw_maps), groups, loss, token_mask=jnp.asarray(mask), kernel_size=5)
    assert float(got5) == pytest.approx(want5, rel=1e-5, abs=1e-6)


def test_subject_maps_and_default_mask(raw_maps):
    groups = [[1], [2, 3]]
    cut = raw_maps[..., :6]  # cut at the EOT (position 6): the default mask is positions 1..5
    want = np_subject_maps(cut, groups, np.arange(6) > 0)
    got = iterref.subject_maps(jnp.asarray(cut), iterref.group_array(groups, 6))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    assert float(iterref.subject_loss(jnp.asarray(cut), groups)) == pytest.approx(np_losses(want)["cn+iou"], rel=1e-5)


def test_bad_loss_string(raw_maps):
    with pytest.raises(ValueError, match="loss="):
        iterref.subject_loss(jnp.asarray(raw_maps), [[1]], "iou+cn")
    with pytest.raises(ValueError, match="loss="):
        iterref.refine(lambda z, t: (z, {}), jnp.zeros((1, 2, 2, 1)), 0, [[1]], lr=0.1, loss="CN")


def test_subject_loss_gradient_finite_differences():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        maps = jnp.asarray(rng.random((6, 6, 5)) * 0.05, jnp.float64)  # scale·A spans ~5 logits
        mask = jnp.asarray([0, 1, 1, 1, 0], bool)
        for loss in iterref.LOSSES:
            f = functools.partial(iterref.subject_loss, token_groups=[[1], [2, 3]], loss=loss, token_mask=mask)
            g = jax.grad(f)(maps)
            assert g.dtype == jnp.float64 and float(jnp.abs(g).max()) > 0
            for seed in range(3):
                v = jnp.asarray(np.random.default_rng(seed).normal(size=maps.shape))
                h = 1e-6
                fd = (float(f(maps + h * v)) - float(f(maps - h * v))) / (2 * h)
                assert float(jnp.vdot(g, v)) == pytest.approx(fd, rel=1e-5, abs=1e-9)


# --- refine ---------------------------------------------------------------------------------------


T = 6
MASK = jnp.asarray([0, 1, 1, 1, 1, 0], bool)  # SOT, four prompt tokens, EOT
PROJ = jnp.asarray(np.random.default_rng(0).normal(size=(4, T)), jnp.float32)


def toy_denoise(z, t):
    """`[B, 8, 8, 4]` -> maps `[B, 8, 8, T]`: softmax over tokens of a linear function of z."""
    return -z, {"attn": jax.nn.softmax(z @ PROJ + 0.0 * t, axis=-1)}


def batch_loss(z, groups):
    attn = toy_denoise(z, 0.0)[1]["attn"]
    return sum(float(iterref.subject_loss(attn[b], groups, token_mask=MASK)) for b in range(z.shape[0]))


@pytest.fixture
def z0():
    return jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 4)), jnp.float32)


def test_refine_reduces_the_loss(z0):
    groups = [[1], [3, 4]]
    refine = jax.jit(functools.partial(iterref.refine, toy_denoise, lr=0.05, token_mask=MASK),
                     static_argnames="n_iters")
    weights = iterref.group_array(groups, T)
    curve = [batch_loss(refine(z0, 0.0, weights, n_iters=n), groups) for n in (0, 5, 10, 20, 40)]
    assert curve[0] == pytest.approx(batch_loss(z0, groups))
    assert all(b <= a + 1e-4 for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] < 0.95 * curve[0], curve


def test_refine_jit_eager_and_per_sample_groups(z0):
    groups = [[1], [3, 4]]
    kw = dict(n_iters=10, lr=0.05, token_mask=MASK)
    eager = iterref.refine(toy_denoise, z0, 0.0, groups, **kw)
    jitted = jax.jit(lambda z, w: iterref.refine(toy_denoise, z, 0.0, w, **kw))(z0, iterref.group_array(groups, T))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-6)
    # `[B, G, T]` subjects: the batch loss is a sum and Adam is elementwise, so each sample is refined
    # as if alone (sample 1's second group is padding).
    w = np.stack([nouns.group_weights(groups, 2, T), nouns.group_weights([[2]], 2, T)])
    both = iterref.refine(toy_denoise, z0, 0.0, jnp.asarray(w), **kw)
    alone = iterref.refine(toy_denoise, z0[1:], 0.0, [[2]], **kw)
    np.testing.assert_allclose(np.asarray(both[:1]), np.asarray(eager[:1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(both[1:]), np.asarray(alone), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(eager), np.asarray(z0))


def test_refine_keeps_dtype_and_zero_iterations(z0):
    out = iterref.refine(toy_denoise, z0.astype(jnp.bfloat16), 0.0, [[1], [2]], n_iters=3, lr=0.05, token_mask=MASK)
    assert out.dtype == jnp.bfloat16
    same = iterref.refine(toy_denoise, z0, 0.0, [[1], [2]], n_iters=0, lr=0.05, token_mask=MASK)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(z0))


def test_batch_loss_averages_the_streams():
    """SD3: the CLIP and T5 streams are processed separately (each its own re-weighting softmax) and
    their losses averaged (SPEC §6)."""

    rng = np.random.default_rng(0)
    attn = jnp.asarray(rng.random((2, 8, 8, 12)), jnp.float32)
    weights = np.zeros((2, 4, 12), np.float32)
    weights[:, 0, 1], weights[:, 1, [2, 3]] = 1.0, 0.5  # stream 1 (positions 0..5)
    weights[:, 0, 7], weights[:, 1, 9] = 1.0, 1.0       # stream 2 (positions 6..11)
    mask = np.zeros((2, 12), bool)
    mask[:, 1:5], mask[:, 6:11] = True, True
    both = iterref.batch_loss(attn, weights, mask, streams=((0, 6), (6, 12)))
    first = iterref.batch_loss(attn[..., :6], weights[..., :6], mask[:, :6])
    second = iterref.batch_loss(attn[..., 6:], weights[..., 6:], mask[:, 6:])
    np.testing.assert_allclose(both, (first + second) / 2, rtol=1e-6)
    assert abs(float(first) - float(second)) > 1e-4  # the average is not one stream's loss
