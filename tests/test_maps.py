"""Map processing (SPEC §2, `ctcal_jax.maps`) against hand-computed values and numpy/torch
references: the Attend-and-Excite Gaussian, min-max, re-weighting, the sub-token mean. These are the
expectations test_ctcal.py held before the functions moved out of `ctcal`."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from ctcal_jax import ctcal, maps
from tests.map_refs import np_kernel, np_smooth


def test_ctcal_reexports_the_same_functions():
    """API.md documents `ctcal.gaussian_smooth`; the names in `ctcal` are the `maps` functions."""
    for name in ("gaussian_kernel_1d", "gaussian_smooth", "minmax_normalize", "reweight", "group_mean",
                 "all_token_weights"):
        assert getattr(ctcal, name) is getattr(maps, name)


def test_kernel_weights():
    np.testing.assert_allclose(maps.gaussian_kernel_1d(3, 0.5), [0.2119, 0.5761, 0.2119], atol=5e-5)
    e1, e4 = np.exp(-1), np.exp(-4)  # k = 5, σ = 0.5: exp(-(x/1)²) at x = 0, ±1, ±2
    np.testing.assert_allclose(maps.gaussian_kernel_1d(5, 0.5), np.array([e4, e1, 1, e1, e4]) / (1 + 2 * e1 + 2 * e4),
                               rtol=1e-6)


def test_smoothing_hand_values_and_references():
    x = np.zeros((1, 3, 3, 1), np.float32)
    x[0, 0, 0, 0] = 1.0  # a corner delta: the reflected copies fall on zeros
    out = np.asarray(maps.gaussian_smooth(jnp.asarray(x), 3, 0.5))[0, :, :, 0]
    c, s = 0.57612, 0.21194
    np.testing.assert_allclose(out, [[c * c, c * s, 0], [s * c, s * s, 0], [0, 0, 0]], atol=1e-4)

    x = np.zeros((1, 3, 3, 1), np.float32)
    x[0, 0, 1, 0] = 1.0  # next to the edges: reflection reaches it from both sides of columns 0 and 2
    out = np.asarray(maps.gaussian_smooth(jnp.asarray(x), 3, 0.5))[0, :, :, 0]
    np.testing.assert_allclose(out, [[2 * c * s, c * c, 2 * c * s], [2 * s * s, s * c, 2 * s * s], [0, 0, 0]], atol=1e-4)

    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 16, 5)).astype(np.float32)
    for k in (3, 5):
        ours = np.asarray(maps.gaussian_smooth(jnp.asarray(x), k, 0.5))
        np.testing.assert_allclose(ours, np_smooth(x, k, 0.5), rtol=1e-5, atol=1e-6)
        # Attend-and-Excite's own path: F.pad(reflect) then one conv2d with the 2-D kernel.
        kernel = torch.from_numpy(np.outer(np_kernel(k, 0.5), np_kernel(k, 0.5)).astype(np.float32))
        t = torch.from_numpy(x).permute(0, 3, 1, 2).reshape(10, 1, 16, 16)
        ref = F.conv2d(F.pad(t, (k // 2,) * 4, mode="reflect"), kernel[None, None])
        np.testing.assert_allclose(ours, ref.reshape(2, 5, 16, 16).permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        maps.gaussian_smooth(jnp.asarray(x), 4, 0.5)


def test_minmax():
    m = np.array([[1.0, 3.0], [2.0, 5.0]], np.float32)[None, :, :, None]
    np.testing.assert_allclose(np.asarray(maps.minmax_normalize(jnp.asarray(m)))[0, :, :, 0], [[0, 0.5], [0.25, 1]])
    const = jnp.full((1, 2, 2, 1), 0.3)
    np.testing.assert_array_equal(np.asarray(maps.minmax_normalize(const)), 0.0)
    g = jax.grad(lambda x: maps.minmax_normalize(x).sum())(const)
    assert np.all(np.isfinite(np.asarray(g)))


def test_reweight():
    a = np.zeros((1, 1, 2, 5), np.float32)
    a[0, 0, 0] = [0.5, 0.01, 0.02, 0.3, 0.9]  # SOT, two prompt tokens, EOT, padding
    mask = np.array([[0, 1, 1, 0, 0]], bool)
    out = np.asarray(maps.reweight(jnp.asarray(a), jnp.asarray(mask), 100.0))
    e = np.e
    np.testing.assert_allclose(out[0, 0, 0], [0, 1 / (1 + e), e / (1 + e), 0, 0], rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], [0, 0.5, 0.5, 0, 0], rtol=1e-6)
    empty = maps.reweight(jnp.asarray(a), jnp.zeros((1, 5), bool))
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


def test_group_mean_and_all_tokens():
    a = np.arange(2 * 1 * 1 * 4, dtype=np.float32).reshape(2, 1, 1, 4)
    w = np.zeros((2, 2, 4), np.float32)
    w[:, 0, 1] = 1.0
    w[:, 1, 2:4] = 0.5
    np.testing.assert_allclose(np.asarray(maps.group_mean(jnp.asarray(a), jnp.asarray(w)))[:, 0, 0],
                               [[1, 2.5], [5, 6.5]])
    eye = np.asarray(maps.all_token_weights(jnp.asarray([[0, 1, 1, 0]], bool)))
    np.testing.assert_array_equal(eye[0], np.diag([0, 1, 1, 0]))


