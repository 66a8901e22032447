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


def train_batch(batch: Any, *, text_inputs: Sequence[str], streams: Mapping[str, tuple[Any, str, str]]) -> None:
    """A training batch as the step reads it (`train_step` module docstring): the latents or images,
    `input_ids` of every text encoder (`text_encoder_3` may be replaced by precomputed `t5_embeds`),
    each stream's `[B, N, T]` noun weights and `[B, T]` token mask, an optional `[B]` reward, and one
    batch size throughout."""
    where = "train step batch"
    if not isinstance(batch, Mapping):
        raise ValueError(f"{where}: expected a dict of arrays, got {type(batch).__name__}")
    keys = sorted(batch)
    if "latents" not in batch and "images" not in batch:
        raise ValueError(f"{where}: expected 'latents' [B, h, w, C] or 'images' [B, H, W, 3], got keys {shorten(keys)}")
    ids = batch.get("input_ids")
    if not isinstance(ids, Mapping):
        raise ValueError(f"{where}: expected 'input_ids', a dict {{text encoder: [B, T] token ids}}, got "
                         f"{'no such key' if ids is None else type(ids).__name__} (keys {shorten(keys)})")
    needed = [c for c in text_inputs if not (c == "text_encoder_3" and "t5_embeds" in batch)]
    missing = [c for c in needed if c not in ids]
    if missing:
        raise ValueError(f"{where}: input_ids lacks {shorten(missing)} (has {shorten(sorted(ids))}; the pipeline's "
                         f"text encoders are {shorten(text_inputs)})")
    images = "latents" if "latents" in batch else "images"
    array(where, images, batch[images], ndim=4, last=3 if images == "images" else None, layout="[B, H, W, C]")
    for c in needed:
        array(where, f"input_ids[{c!r}]", ids[c], ndim=2, layout="[B, T]")
    for _, weights_key, mask_key in streams.values():
        for key in (weights_key, mask_key):
            if key not in batch:
                raise ValueError(f"{where}: the CTCAL objective reads {key!r}, which the batch lacks "
                                 f"(keys {shorten(keys)}); data sources add it from the prompt's nouns")
        array(where, weights_key, batch[weights_key], ndim=3, layout="[B, N, T]")
        array(where, mask_key, batch[mask_key], ndim=2, layout="[B, T]")
        if _shape(batch[weights_key])[2] != _shape(batch[mask_key])[1]:
            raise ValueError(f"{where}: {weights_key} {_shape(batch[weights_key])} and {mask_key} "
                             f"{_shape(batch[mask_key])} must have the same token axis T")
    if "reward" in batch:
        array(where, "reward", batch["reward"], ndim=1, layout="[B]")
    arrays = [(images, batch[images])] + [(f"input_ids[{c!r}]", ids[c]) for c in needed] + [
        (k, v) for k, v in batch.items() if k not in (images, "input_ids")]
    batch_of = [(name, x) for name, x in arrays if _shape(x)]
    batch_sizes = {name: _shape(x)[0] for name, x in batch_of}
    if len(set(batch_sizes.values())) > 1:
        raise ValueError(f"{where}: every array needs the same batch size B on its first axis, got "
                         f"{shorten(f'{k} {v}' for k, v in batch_sizes.items())}")
