"""Rematerialisation per block: what a model's repeated blocks keep for the backward pass.

Every denoiser and text encoder has a `remat` attribute, one of `POLICIES`' keys:
- `"none"` (default): every block keeps all its activations (plain autodiff);
- `"dots"`: a block keeps the outputs of its matmuls without batch dimensions (the q/k/v/out
  projections, feed-forwards, AdaLN linears) and recomputes the rest during the backward pass: norms,
  activations, the attention scores, probabilities and weighted sums (batched over heads) and, in the
  UNet's resnets, the convolutions (JAX's policy saves `dot_general` outputs only):
  `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`;
- `"full"`: a block keeps only its inputs and reruns its whole forward in the backward pass:
  `jax.checkpoint_policies.nothing_saveable`.

`block(cls, remat, static_argnums)` wraps a block class with `flax.linen.remat`. The wrapped class
takes the same fields and the same `name`, so parameter paths (conversion, LoRA files, sharding
rules) do not change. The attribute is set after building, as `implementation` is:
`conversion.unet.build(config).clone(remat="full")`; the CTCAL families take it as
`make_family(..., remat=...)` and set it on the denoiser and the text encoders they run.

Python values that steer a block's tracing (`capture`) must be passed positionally and listed in
`static_argnums` (counting `self` as 0): `jax.checkpoint` traces keyword arguments as arrays.
`prevent_cse` stays True (flax's default): the blocks are unrolled, not scanned, and without it XLA
may merge the recomputation with the forward pass and keep the activations after all.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import jax
import jax.extend
from flax import linen as nn

Remat = Literal["none", "dots", "full"]

POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check(remat: str) -> None:
    """Raise ValueError unless `remat` names a policy."""
    if remat not in POLICIES:
        raise ValueError(f"remat={remat!r} is not a policy; expected one of {sorted(POLICIES)}")


def block(cls: type[nn.Module], remat: Remat, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """`cls` itself for `"none"`, else `cls` wrapped with `nn.remat` and the policy's saveable rule."""
    check(remat)
    if remat == "none":
        return cls
    return nn.remat(cls, policy=POLICIES[remat], static_argnums=static_argnums, prevent_cse=True)


def kept_bytes(f: Callable[..., Any], *args: Any) -> int:
    """Bytes of the activations `jax.vjp(f, *args)` keeps for the backward pass: its residuals, less
    those that are `args` themselves, also when reached through `stop_gradient` (a frozen weight the
    backward pass multiplies by is the argument's own buffer, not a copy). Traced, not computed
    (`args` may be `jax.ShapeDtypeStruct`s), so it measures the policy, whatever a backend's
    scheduler later does with it. The residuals are those `jax.ad_checkpoint.print_saved_residuals`
    lists.
    """
    leaves, tree = jax.tree.flatten(args)

    def flat(*xs):
        return f(*jax.tree.unflatten(tree, xs))

    closed, shapes = jax.make_jaxpr(lambda *xs: jax.vjp(flat, *xs), return_shape=True)(*leaves)
    jaxpr = closed.jaxpr
    residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(shapes[1])):]
    # Ops that pass a value through unchanged at run time: look through them to their input.
    through = {e.outvars[0]: e.invars[0] for e in jaxpr.eqns
               if e.primitive.name in ("stop_gradient", "reduce_precision") and e.invars}
    arguments, kept = set(jaxpr.invars), set()
    for v in residuals:
        if isinstance(v, jax.extend.core.Literal):
            continue
        while v in through:
            v = through[v]
        if v not in arguments:
            kept.add(v)
    return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in kept)
