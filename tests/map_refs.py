"""Independent numpy references for the map processing of SPEC §2 (`ctcal_jax.maps`), written
with explicit loops or the textbook formula; shared by test_maps, test_ctcal and test_iterref."""

import numpy as np


def np_kernel(k, sigma):
    x = np.arange(k) - (k - 1) / 2
    w = np.exp(-((x / (2 * sigma)) ** 2))
    return w / w.sum()


def np_smooth(maps, k, sigma):
    """Attend-and-Excite: reflect pad, one 2-D (outer-product) kernel, "same" — with explicit loops."""
    w2 = np.outer(np_kernel(k, sigma), np_kernel(k, sigma))
    p = k // 2
    padded = np.pad(maps, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    out = np.zeros_like(maps, dtype=np.float64)
    for a in range(k):
        for b in range(k):
            out += w2[a, b] * padded[:, a:a + maps.shape[1], b:b + maps.shape[2]]
    return out


def np_minmax(m):
    lo, hi = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
    return np.where(hi - lo > 0, (m - lo) / np.where(hi - lo > 0, hi - lo, 1), 0)


def np_softmax_masked(maps, mask, scale):
    x = np.where(mask[:, None, None, :], scale * maps, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_group(maps, weights):
    return np.einsum("bhwt,bnt->bhwn", maps, weights)
