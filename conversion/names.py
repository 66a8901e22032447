"""PyTorch state-dict keys <-> Flax parameter paths, and the per-leaf transforms between them.

The Flax models name their submodules after diffusers/transformers module paths with list indices
joined by an underscore (`down_blocks.0.attentions.1` <-> `down_blocks_0/attentions_1`), so the
mapping is mechanical:
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

Path = tuple[str, ...]
Rename = Callable[[str], "Path | None"]

# Names of PyTorch ModuleList / Sequential attributes: `name_N` in Flax is `name.N` in PyTorch.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "single_transformer_blocks", "to_out", "to_add_out", "net", "layers",
    "block", "layer", "mid_block_resnets", "proj_out_layers",
})

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def split_key(key: str) -> Path:
    """`down_blocks.0.attentions.1.proj_in.weight` -> (`down_blocks_0`, `attentions_1`, `proj_in`, `weight`)."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def join_path(path: Path, list_names: Iterable[str] = LIST_NAMES) -> str:
    """Inverse of `split_key` for module parts (the leaf is handled by `flax_to_torch`)."""
    names = frozenset(list_names)
    parts = []
    for p in path:
        stem, _, idx = p.rpartition("_")
        parts.append(f"{stem}.{idx}" if idx.isdigit() and stem in names else p)
    return ".".join(parts)


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


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
    targets = flatten(abstract_params)
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
    missing = sorted("/".join(p) for p in targets if p not in out)
    problems = []
    if mismatched:
        problems.append("shape mismatches:\n  " + "\n  ".join(mismatched))
    if unexpected:
        problems.append(f"unexpected keys (no such parameter): {sorted(unexpected)}")
    if missing:
        problems.append(f"parameters missing from the checkpoint: {missing}")
    if problems:
        raise ValueError(f"{source}: weights do not fit the model config:\n" + "\n".join(problems))
    return unflatten(out)


def flax_to_torch(params: Mapping[str, Any], list_names: Iterable[str] = LIST_NAMES) -> dict[str, np.ndarray]:
    """Flax parameter tree -> PyTorch state dict (numpy), the inverse of `torch_to_flax`."""
    out = {}
    for path, value in flatten(params).items():
        leaf = "weight" if path[-1] in _WEIGHT_LEAVES else path[-1]
        key = join_path(path[:-1], list_names) + "." + leaf
        out[key] = _to_torch_leaf(np.asarray(jax.device_get(value)), path[-1])
    return out
