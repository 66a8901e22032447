"""Regex sharding rules and optimizer groups: first match wins, no match is an error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ctcal_jax.lora import Alpha
from ctcal_jax.optim import adamw_groups, group_labels
from ctcal_jax.sharding import make_mesh, param_shardings

TREE = {
    "unet": {"down_0": {"to_q": {"A": jnp.ones((8, 2)), "B": jnp.zeros((2, 6)), "alpha": Alpha(2.0)}}},
    "ae": {"conv": {"kernel": jnp.ones((3, 3, 1, 8)), "bias": jnp.zeros((8,))}},
}


def test_make_mesh_fills_the_remaining_axis_and_checks_sizes():
    mesh = make_mesh(data=-1, fsdp=1)
    assert mesh.shape == {"data": jax.device_count(), "fsdp": 1}
    with pytest.raises(ValueError, match="does not equal"):
        make_mesh(data=jax.device_count() + 1, fsdp=1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_first_matching_rule_wins_and_unmatched_is_an_error():
    mesh = make_mesh()
    rules = [(r"/A$", ("fsdp", None)), (r"^ae/", ()), (r".*", (None,))]
    shardings = param_shardings(TREE, rules, mesh)
    assert shardings["unet"]["down_0"]["to_q"]["A"].spec == P("fsdp", None)
    assert shardings["ae"]["conv"]["kernel"].spec == P()
    with pytest.raises(ValueError, match="unet/down_0/to_q/B"):
        param_shardings(TREE, [(r"/A$", ()), (r"^ae/", ())], mesh)


def test_groups_label_by_first_match_and_name_the_unmatched_leaf():
    groups = [(r"/B$", 0.0, 0.0), (r"^unet/", 1e-3, 0.01), (r"^ae/", 1e-2, 0.0)]
    labels = group_labels(TREE, groups)
    assert labels["unet"]["down_0"]["to_q"] == {"A": "1", "B": "0", "alpha": Alpha(2.0)}  # alpha: no leaf
    assert labels["ae"]["conv"] == {"kernel": "2", "bias": "2"}
    with pytest.raises(ValueError, match="ae/conv/bias"):
        group_labels(TREE, groups[:2] + [(r"kernel$", 1e-2, 0.0)])


def test_adamw_groups_apply_their_own_rates_and_freeze_lr_zero():
    groups = [(r"/B$", 0.0, 0.0), (r"^unet/", 1e-3, 0.0), (r"^ae/", 1e-2, 0.5)]
    opt = adamw_groups(TREE, groups)
    grads = jax.tree.map(jnp.ones_like, TREE)
    updates, _ = opt.update(grads, opt.init(TREE), TREE)
    # Adam's first step moves every leaf by lr · sign(g) (bias-corrected); AdamW adds lr · wd · p.
    np.testing.assert_allclose(updates["unet"]["down_0"]["to_q"]["A"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["ae"]["conv"]["kernel"], -1e-2 * (1 + 0.5 * 1.0), rtol=1e-4)
    assert not np.any(updates["unet"]["down_0"]["to_q"]["B"])
    new = optax.apply_updates(TREE, updates)
    assert new["unet"]["down_0"]["to_q"]["alpha"] == Alpha(2.0)
