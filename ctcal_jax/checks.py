"""Argument checks at the public boundaries, done while tracing (shapes and dtypes are static, so a
check costs nothing in the compiled program).

Each failure is one `ValueError` line naming the argument, what was expected and what came, instead
of an error from inside einsum, a convolution or Flax's scope machinery several frames down.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def shorten(items: Iterable[Any], limit: int = 6) -> str:
    """`"a, b, c ... and 12 more"`: a long list cut for a one-line message."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def array(where: str, name: str, x: Any, *, ndim: int, last: int | None = None, layout: str = "") -> None:
    """`x` has `ndim` axes (and `last` entries on the last axis, when given)."""
    shape = _shape(x)
    if len(shape) != ndim:
        raise ValueError(f"{where}: {name} must have {ndim} axes{f' ({layout})' if layout else ''}, got shape {shape}")
    if last is not None and shape[-1] != last:
        hint = " (NHWC expected: channels last)" if ndim == 4 and last in shape[1:3] else ""
        raise ValueError(f"{where}: {name} must have {last} entries on its last axis{f' ({layout})' if layout else ''}, "
                         f"got shape {shape}{hint}")


def batch(where: str, reference: tuple[str, Any], *others: tuple[str, Any]) -> None:
    """Every array's leading axis equals the reference's (no silent broadcasting of a batch of 1)."""
    name, x = reference
    b = _shape(x)[0]
    for other, y in others:
        if _shape(y)[0] != b:
            raise ValueError(f"{where}: {other} has batch {_shape(y)[0]} but {name} has batch {b} "
                             f"(shapes {_shape(y)} and {_shape(x)})")


def timesteps(where: str, t: Any, b: int) -> None:
    """A scalar, `[1]` or `[B]` timestep argument."""
    shape = _shape(t)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, b)):
        raise ValueError(f"{where}: timesteps must be a scalar or one per sample, shape ({b},), got shape {shape}")


def kernel_shape(params: Mapping[str, Any] | None, *path: str) -> tuple[int, ...] | None:
    """The shape of `params[path...]["kernel"]` when the params hold it (None while initialising)."""
    node: Any = params
    for key in (*path, "kernel"):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return _shape(node)


def find_kernel(params: Mapping[str, Any] | None, suffix: tuple[str, ...]) -> tuple[int, ...] | None:
    """The shape of the first kernel whose path ends with `suffix` (e.g. `("attn2", "to_k")`)."""
    if not params:
        return None
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        if keys[-1] == "kernel" and keys[-1 - len(suffix):-1] == suffix:
            return _shape(leaf)
    return None


def positive_float(where: str, name: str, value: Any) -> None:
    """A Python number that is finite and > 0 (arrays pass: they are checked where they are made)."""
    if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")


def int_tuple(where: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    """A tuple (or list) of ints."""
    if value is None and allow_none:
        return
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: {name} must be a tuple of ints{' or None' if allow_none else ''}, "
                         f"e.g. {name}=(16,), got {value!r}")
