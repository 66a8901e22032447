"""AdamW with parameter groups chosen by regular expressions over parameter paths (SPEC §3).

A group is `(pattern, learning_rate, weight_decay)`; each trainable leaf takes the first group whose
pattern matches its '/'-joined path (`unet/down_blocks_2/.../to_q/A`, `text_encoder/...`, `ae/...`).
A leaf no group matches is an error. A group with learning rate 0 freezes its leaves (no update,
no weight decay). LoRA alphas are not leaves (`ctcal_jax.lora.Alpha`), so no group can touch them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from ctcal_jax.sharding import path_str

Group = tuple[str, float, float]


def group_labels(tree: Any, groups: Sequence[Group]) -> Any:
    """The index (as a string) of the group each leaf belongs to."""
    compiled = [re.compile(pattern) for pattern, _, _ in groups]

    def label(path, _):
        name = path_str(path)
        for i, pattern in enumerate(compiled):
            if pattern.search(name):
                return str(i)
        raise ValueError(f"optimizer: no parameter group matches {name!r} (groups: {[g[0] for g in groups]})")

    return jax.tree_util.tree_map_with_path(label, tree)


def adamw_groups(
    tree: Any,
    groups: Sequence[Group],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    warmup_steps: int = 0,
) -> optax.GradientTransformation:
    """AdamW per group (constant learning rate after an optional linear warm-up)."""

    def schedule(lr: float):
        return optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else lr

    transforms = {
        str(i): optax.adamw(schedule(lr), b1=b1, b2=b2, eps=eps, weight_decay=wd) if lr else optax.set_to_zero()
        for i, (_, lr, wd) in enumerate(groups)
    }
    return optax.multi_transform(transforms, group_labels(tree, groups))
