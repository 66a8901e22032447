"""Functional LoRA: a pytree of low-rank adapters beside the frozen params, merged on demand.

Layout (the trainer's trainable state and the unit of import/export), a flat dict keyed by the
diffusers-style dotted module path of a Dense layer:

    {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
        {"A": f32[in, r], "B": f32[r, out], "alpha": f32[]},  ...}

The dotted path is the Flax path with list indices joined back (`names.join_path`), so it is the
module name diffusers, peft and transformers use. The merged kernel is `W' = W + (alpha / r) · A @ B`
for a Flax kernel `W [in, out]`: with PyTorch's `lora_A = Aᵀ [r, in]` and `lora_B = Bᵀ [out, r]`
this is peft's `W + (alpha / r) · lora_B @ lora_A`. The rank is `A.shape[1]` (static under jit).

`alpha` is a hyperparameter stored as a scalar so that `merge` needs nothing but the two pytrees;
`merge` stops its gradient, and an optimiser must leave it alone too (select the trainable leaves
by path, `A` and `B`, so that weight decay does not shrink `alpha`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from conversion import names

# Attention projections of the UNet (`attn1`, `attn2`) and the MM-DiT (`attn`, `attn2`).
DEFAULT_TARGETS = r"attn\d?\.(to_q|to_k|to_v|to_out\.0)$"

LoraParams = dict[str, dict[str, jax.Array]]


def kernels(params: Mapping[str, Any]) -> dict[str, tuple[names.Path, tuple[int, ...]]]:
    """Every module of `params` holding a `kernel`: dotted module path -> (Flax kernel path, shape)."""
    return {
        names.join_path(path[:-1]): (path, tuple(leaf.shape))
        for path, leaf in names.flatten(params).items()
        if path[-1] == "kernel"
    }


def init(
    rng: jax.Array,
    params: Mapping[str, Any],
    targets: str = DEFAULT_TARGETS,
    rank: int = 4,
    alpha: float = 4.0,
) -> LoraParams:
    """Adapters for the Dense layers whose dotted module path matches `targets` (`re.search`).

    `A` is drawn like peft's default (kaiming-uniform with a=√5: U(±1/√in)), `B` is zero, so the
    merged params equal `params` until `B` is trained. Raises `ValueError` when `targets` matches
    no Dense kernel, or matches a kernel that is not a Dense `[in, out]` one (a convolution).
    """
    matched = {m: shape for m, (_, shape) in kernels(params).items() if re.search(targets, m)}
    not_dense = sorted(m for m, shape in matched.items() if len(shape) != 2)
    if not_dense:
        raise ValueError(f"LoRA targets {targets!r} match modules that are not Dense layers: {not_dense}")
    if not matched:
        raise ValueError(f"LoRA targets {targets!r} match no Dense kernel in the params")
    out: LoraParams = {}
    for key, (module, (d_in, d_out)) in zip(jax.random.split(rng, len(matched)), sorted(matched.items())):
        bound = 1.0 / d_in**0.5
        out[module] = {
            "A": jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound),
            "B": jnp.zeros((rank, d_out), jnp.float32),
            "alpha": jnp.asarray(alpha, jnp.float32),
        }
    return out


def merge(params: Mapping[str, Any], lp: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, Any]:
    """`params` with every adapted kernel replaced by `W + (alpha / r) · A @ B`, in `W`'s dtype.

    Pure and jittable. Raises `ValueError` naming the modules of `lp` that are not Dense layers of
    `params` or whose `A`/`B` shapes do not fit the kernel.
    """
    found = kernels(params)
    problems = []
    for module, ab in sorted(lp.items()):
        if module not in found:
            problems.append(f"{module}: no Dense kernel with this module path")
            continue
        shape = found[module][1]
        a, b = tuple(ab["A"].shape), tuple(ab["B"].shape)
        if len(shape) != 2 or len(a) != 2 or len(b) != 2 or a[1] != b[0] or (a[0], b[1]) != shape:
            problems.append(f"{module}: A {a} @ B {b} does not fit the kernel {shape}")
    if problems:
        raise ValueError("LoRA does not fit the params:\n  " + "\n  ".join(problems))
    flat = names.flatten(params)
    for module, ab in lp.items():
        path = found[module][0]
        w = flat[path]
        a = jnp.asarray(ab["A"], jnp.float32)
        scale = jax.lax.stop_gradient(jnp.asarray(ab["alpha"], jnp.float32)) / a.shape[1]
        delta = jnp.matmul(a, jnp.asarray(ab["B"], jnp.float32), precision=jax.lax.Precision.HIGHEST)
        flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return names.unflatten(flat)
