"""PyTorch state-dict keys <-> Flax parameter paths, and the per-leaf transforms between them.

The Flax models name their submodules after diffusers/transformers module paths with list indices
joined by an underscore (`down_blocks.0.attentions.1` <-> `down_blocks_0/attentions_1`,
`ctcal_jax.paths`), so the mapping is mechanical:
- a numeric key part joins the part before it (`to_out.0` -> `to_out_0`);
- the final `weight` becomes `kernel` (Dense, Conv), `scale` (norms) or `embedding` (Embed),
  whichever the Flax module has; `bias` stays `bias`;
- Linear `[out, in]` <-> Dense `[in, out]`; Conv2d `[out, in, kh, kw]` <-> Conv `[kh, kw, in, out]`.
Families with names that do not follow the rule pass a `rename` function for those keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from conversion.files import shortlist
from ctcal_jax.paths import LIST_NAMES, Path, join_path, split_key  # noqa: F401  (re-exported)

Rename = Callable[[str], "Path | None"]

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def _to_flax_leaf(x: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    if leaf == "kernel" and x.ndim == 4 and target_ndim == 4:
        return x.transpose(2, 3, 1, 0)
    if leaf == "kernel" and x.ndim == 2 and target_ndim == 2:
        return x.T
    return x


def _to_torch_leaf(x: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    if leaf == "kernel" and x.ndim == 2:
        return x.T
    return x


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping[str, Any],
    *,
    source: str,
    rename: Rename | None = None,
) -> dict[str, Any]:
    """Convert a PyTorch state dict to the Flax parameter tree whose shapes `abstract_params` gives.

    Every Flax parameter must be filled and every PyTorch tensor used (a `rename` returning `None`
    marks a key to skip, such as a buffer). Otherwise raises `ValueError` naming `source`, the
    keys and both shapes.
    """
    targets = flatten_dict(abstract_params)
    out: dict[Path, np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, tensor in state_dict.items():
        path = rename(key) if rename is not None else split_key(key)
        if path is None:
            continue
        if path[-1] == "weight":
            leaf = next((w for w in _WEIGHT_LEAVES if path[:-1] + (w,) in targets), "weight")
            path = path[:-1] + (leaf,)
        if path not in targets:
            unexpected.append(key)
            continue
        want = targets[path].shape
        value = _to_flax_leaf(np.asarray(tensor), path[-1], len(want))
        if tuple(value.shape) != tuple(want):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} -> {tuple(value.shape)}, model expects {tuple(want)}")
            continue
        out[path] = value
    # A missing parameter is named by the checkpoint key that would fill it (the generic rule).
    missing = sorted(join_path(p[:-1]) + "." + ("weight" if p[-1] in _WEIGHT_LEAVES else p[-1])
                     for p in targets if p not in out)
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:5])
                        + (f"; ... and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (no such parameter): {shortlist(sorted(unexpected))}")
    if missing:
        problems.append(f"{len(missing)} keys missing from the checkpoint: {shortlist(missing)}")
    if problems:
        raise ValueError(f"{source}: weights do not fit the model config: " + "; ".join(problems))
    return unflatten_dict(out)


def flax_to_torch(params: Mapping[str, Any], list_names: Iterable[str] = LIST_NAMES) -> dict[str, np.ndarray]:
    """Flax parameter tree -> PyTorch state dict (numpy), the inverse of `torch_to_flax`."""
    out = {}
    for path, value in flatten_dict(params).items():
        leaf = "weight" if path[-1] in _WEIGHT_LEAVES else path[-1]
        key = join_path(path[:-1], list_names) + "." + leaf
        out[key] = _to_torch_leaf(np.asarray(jax.device_get(value)), path[-1])
    return out
