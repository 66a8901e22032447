"""LoRA: low-rank adapters beside the frozen params, applied unmerged in the forward (SPEC §7).

One format everywhere: `init`, `conversion.import_lora` and the trainer produce it; the `"lora"`
variable collection, `merge` and `conversion.export_lora` take it. It is a tree nested like the
params holding, at the path of each adapted Dense layer,

    {"A": f32[in, r], "B": f32[r, out], "alpha": Alpha(α)}

e.g. `lp["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]`. For the Flax
kernel `W [in, out]` the update is `(α / r) · A @ B`; peft's `lora_A = Aᵀ [r, in]` and
`lora_B = Bᵀ [out, r]` give the same `W_torch + (α / r) · lora_B @ lora_A`. The rank `r` is
`A.shape[1]`. A and B are float32 whatever the weights' dtype. `alpha` is static pytree metadata
(`Alpha`), not an array leaf: gradients, optimizers, weight decay and `jax.tree.map` never see it,
so nothing can train or decay it (per-module alphas, as peft's `alpha_pattern`, are just different
`Alpha`s).

Applied unmerged by `Dense`, the Dense layer of every model here:
`y = x W + b + (α / r) · (x A) B`, the branch computed in float32 (peft's way), so
- no merged copy of W exists and the backward forms no full-size weight gradient
  (`dA = xᵀ (dy Bᵀ) · α/r`, `dB = (x A)ᵀ dy · α/r`);
- an update below W's last bit (bf16 weights) still changes a float32 output.
`model.apply({"params": p, "lora": lp}, ...)` equals `model.apply({"params": merge(p, lp)}, ...)`.
`gated(lp, gate)` multiplies the branch by a per-sample `gate [B]`, so one batch can hold samples
with and without the LoRA under one jit (TACA's LoRA is active exactly while TACA is, SPEC §4).
`merge` remains for merged export and merged inference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from flax import traverse_util

from ctcal_jax.paths import Path, join_path

# Attention projections of the UNet (`attn1`, `attn2`) and the MM-DiT (`attn`, `attn2`).
DEFAULT_TARGETS = r"attn\d?\.(to_q|to_k|to_v|to_out\.0)$"

Adapter = dict[str, Any]  # {"A", "B", "alpha"}; "gate" too inside a forward (`gated`)
LoraTree = dict[str, Any]


@struct.dataclass
class Alpha:
    """A LoRA alpha held as static pytree metadata: part of the tree's structure, never a leaf."""

    value: float = struct.field(pytree_node=False)


def is_adapter(node: Any) -> bool:
    return isinstance(node, Mapping) and "A" in node and "B" in node


def adapters(lp: Mapping[str, Any]) -> dict[Path, Adapter]:
    """Every adapter of a LoRA tree by the Flax path of its Dense layer."""
    return traverse_util.flatten_dict(lp, is_leaf=lambda _, node: is_adapter(node))


def from_paths(flat: Mapping[Path, Adapter]) -> LoraTree:
    """The LoRA tree holding `{Flax path of a Dense layer: adapter}`."""
    return traverse_util.unflatten_dict(dict(flat))


def alpha(adapter: Mapping[str, Any]) -> float:
    """The adapter's alpha as a Python float (an `Alpha`, or a plain number)."""
    a = adapter["alpha"]
    return float(a.value if isinstance(a, Alpha) else a)


def rank(adapter: Mapping[str, Any]) -> int:
    return adapter["A"].shape[-1]


def kernels(params: Mapping[str, Any]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every module of `params` holding a `kernel`: dotted module path -> (Flax module path, shape)."""
    return {
        join_path(path[:-1]): (path[:-1], tuple(leaf.shape))
        for path, leaf in traverse_util.flatten_dict(params).items()
        if path[-1] == "kernel"
    }


def init(
    rng: jax.Array,
    params: Mapping[str, Any],
    targets: str = DEFAULT_TARGETS,
    rank: int = 4,
    alpha: float = 4.0,
) -> LoraTree:
    """Adapters for the Dense layers whose dotted module path matches `targets` (`re.search`).

    `A` is drawn like peft's default (kaiming-uniform with a=√5: U(±1/√in)), `B` is zero, so the
    model is unchanged until `B` is trained. Raises `ValueError` when `targets` matches no Dense
    kernel, or matches a kernel that is not a Dense `[in, out]` one (a convolution).
    """
    matched = {m: found for m, found in kernels(params).items() if re.search(targets, m)}
    not_dense = sorted(m for m, (_, shape) in matched.items() if len(shape) != 2)
    if not_dense:
        raise ValueError(f"LoRA targets {targets!r} match modules that are not Dense layers: {not_dense}")
    if not matched:
        raise ValueError(f"LoRA targets {targets!r} match no Dense kernel in the params")
    flat = {}
    for key, (path, (d_in, d_out)) in zip(jax.random.split(rng, len(matched)),
                                          (matched[m] for m in sorted(matched))):
        bound = 1.0 / d_in**0.5
        flat[path] = {
            "A": jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound),
            "B": jnp.zeros((rank, d_out), jnp.float32),
            "alpha": Alpha(float(alpha)),
        }
    return from_paths(flat)


def fit_problems(params: Mapping[str, Any], lp: Mapping[str, Any]) -> list[str]:
    """Why `lp` does not fit `params` (one line per adapter, by dotted module path); [] when it does."""
    dense = {path: shape for path, shape in kernels(params).values()}
    problems = []
    for path, ad in sorted(adapters(lp).items()):
        module = join_path(path)
        if path not in dense:
            problems.append(f"{module}: no Dense kernel with this module path")
            continue
        a, b, shape = tuple(ad["A"].shape), tuple(ad["B"].shape), dense[path]
        if len(shape) != 2 or len(a) != 2 or len(b) != 2 or a[1] != b[0] or (a[0], b[1]) != shape:
            problems.append(f"{module}: A {a} @ B {b} does not fit the kernel {shape}")
    return problems


def check(params: Mapping[str, Any], lp: Mapping[str, Any], what: str = "LoRA") -> None:
    """Raise `ValueError` naming every adapter of `lp` that does not fit a Dense layer of `params`."""
    problems = fit_problems(params, lp)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ValueError(f"{what} does not fit the params:\n  " + "\n  ".join(shown))


def merge(params: Mapping[str, Any], lp: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with every adapted kernel replaced by `W + (α / r) · A @ B`, in `W`'s dtype.

    Pure and jittable; for merged export and merged inference (training applies the LoRA
    unmerged). Raises `ValueError` naming the adapters that do not fit a Dense layer of `params`.
    """
    check(params, lp)
    flat = traverse_util.flatten_dict(params)
    for path, ad in adapters(lp).items():
        w = flat[path + ("kernel",)]
        delta = jnp.matmul(jnp.asarray(ad["A"], jnp.float32), jnp.asarray(ad["B"], jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        flat[path + ("kernel",)] = (w.astype(jnp.float32) + scale(ad) * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def scale(adapter: Mapping[str, Any]) -> float:
    """α / r of one adapter."""
    return alpha(adapter) / rank(adapter)


def gated(lp: Mapping[str, Any], gate: jax.Array) -> LoraTree:
    """`lp` with its branch multiplied by `gate [B]` (0/1, or any weight) for each sample.

    For inside a forward: `model.apply({"params": p, "lora": gated(lp, active)}, ...)`.
    """
    return from_paths({path: {**ad, "gate": gate} for path, ad in adapters(lp).items()})


class Dense(nn.Module):
    """`flax.linen.Dense` with the unmerged LoRA branch of the `"lora"` collection, when the caller
    passes an adapter for this layer (module docstring).

    The parameters (`kernel [in, out]`, `bias [out]`), their initialisers and the dtype promotion
    are `nn.Dense`'s, so checkpoints, conversion and sharding rules see no difference. Written out
    rather than subclassed: linen allows one compact method per module and the branch needs the
    layer's input.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        xc, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(xc, kernel, (((xc.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y = y + bias
        if self.has_variable("lora", "A"):
            y = _add_branch(self.variables["lora"], x, y)
        return y


def _add_branch(adapter: Mapping[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    """`y + (α / r) · (x A) B`: the branch in float32, its `[..., out]` product written in `y`'s dtype
    (accumulated in float32; with bf16 compute it is the size of the layer's own output, which is
    what a remat policy keeps of it), the sum in float32, the result in `y`'s dtype."""
    a, b = adapter["A"], adapter["B"]
    if a.shape[0] != x.shape[-1] or b.shape[1] != y.shape[-1]:
        raise ValueError(f"LoRA adapter A {a.shape} @ B {b.shape} does not fit a Dense layer "
                         f"{x.shape[-1]} -> {y.shape[-1]}")
    f32 = jnp.float32
    xa = jnp.dot(x.astype(f32), a.astype(f32)) * scale(adapter)  # [..., r]
    delta = jnp.dot(xa, b.astype(f32), preferred_element_type=y.dtype)
    if "gate" in adapter:
        gate = jnp.asarray(adapter["gate"], f32)
        if gate.shape != (x.shape[0],):
            raise ValueError(f"LoRA gate: expected one value per sample, shape ({x.shape[0]},), got {gate.shape}")
        delta = delta * gate.reshape((-1,) + (1,) * (delta.ndim - 1))
    return (y.astype(f32) + delta).astype(y.dtype)


def check_collection(module: nn.Module) -> None:
    """Inside a model's top-level `__call__`: a `"lora"` collection that does not fit the model's
    params is an error (at trace time), not an adapter silently ignored."""
    lp = module.variables.get("lora")
    if lp:
        check(module.variables["params"], lp, what='the "lora" collection')
