"""Meshes and regex sharding rules (SPEC §8).

One mesh with axes `data` and `fsdp`; the batch is split over both, parameters are sharded by
regular expressions over their '/'-joined Flax paths (`down_blocks_2/attentions_0/.../to_q/kernel`).
The first matching rule wins; a parameter no rule matches is an error, never a silent default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, tuple[str | None, ...]]]

BATCH_AXES = ("data", "fsdp")

# Default rules: shard the largest axis of big kernels over `fsdp`, replicate the rest.
DEFAULT_RULES: Rules = (
    (r".*/kernel$", ("fsdp_largest",)),
    (r".*", ()),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (`data`, `fsdp`) mesh over all devices; -1 takes whatever the other axis leaves."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} × fsdp={fsdp} does not equal the {n} devices")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def path_str(path: tuple[Any, ...]) -> str:
    """A pytree key path as `a/b/c`."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _spec(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> P:
    if axes == ("fsdp_largest",):
        size = mesh.shape["fsdp"]
        # Shard the largest dimension that divides evenly; replicate small or indivisible leaves.
        dims = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in dims:
            if size > 1 and shape[i] % size == 0 and shape[i] >= size:
                spec = [None] * len(shape)
                spec[i] = "fsdp"
                return P(*spec)
        return P()
    return P(*axes)


def param_shardings(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the first matching rule."""
    compiled = [(re.compile(pattern), axes) for pattern, axes in rules]

    def one(path, leaf):
        name = path_str(path)
        for pattern, axes in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, _spec(tuple(np.shape(leaf)), tuple(axes), mesh))
        raise ValueError(f"sharding: no rule matches parameter {name!r} (rules: {[p for p, _ in rules]})")

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` and `fsdp`."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
