"""Rematerialisation per block (`models.remat`): for every denoiser and text encoder and every policy,
the same parameter tree, outputs, attention maps and gradients as without remat, and fewer
activations kept for the backward pass.

The models are tiny and built from configs with `conversion.<family>.build(...).clone(remat=...)`,
as a trainer does; weights are random at a healthy scale (`conversion.tiny.random_params`).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conversion import clip, mmdit, t5, unet
from ctcal_jax.attention import TACA, AttnCapture
from conversion.tiny import random_params
from ctcal_jax.families.unet import with_remat
from ctcal_jax.models import remat as remat_lib
from ctcal_jax.text import PromptEncoders
from tests.tiny import rel_err

POLICIES = ["dots", "full"]
# make test's budget: "full" in the slow checks; "dots" exercises the same wrapping.
POLICY_PARAMS = ["dots", pytest.param("full", marks=pytest.mark.slow)]

UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
)
# SD3.5-medium style: dual attention in some blocks, qk RMS norm; the last block is context_pre_only.
MMDIT = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
             num_attention_heads=3, joint_attention_dim=16, caption_projection_dim=24,
             pooled_projection_dim=12, out_channels=6, pos_embed_max_size=13,
             dual_attention_layers=(0, 2), qk_norm="rms_norm")
CLIP = dict(architectures=["CLIPTextModelWithProjection"], vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
            eos_token_id=63, projection_dim=24)
T5 = dict(vocab_size=64, d_model=24, d_kv=6, d_ff=40, num_layers=3, num_heads=3, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=16, relative_attention_max_distance=24)


def _unet_case():
    rng = np.random.RandomState(0)
    args = (rng.randn(2, 16, 16, 4).astype(np.float32), np.array([10.0, 900.0], np.float32),
            rng.randn(2, 7, 24).astype(np.float32))
    # maps of the 16×16 level and the 8×8 mid block (resized to 16×16, then averaged)
    return unet.build(UNET), args, dict(capture=AttnCapture(resolutions=(16, 8)))


def _mmdit_case():
    rng = np.random.RandomState(0)
    args = (rng.randn(2, 16, 12, 4).astype(np.float32), np.array([980.0, 500.0], np.float32),
            rng.randn(2, 7, 16).astype(np.float32), rng.randn(2, 12).astype(np.float32))
    # maps of blocks 0 and 2 (not 1), TACA on the first sample
    return mmdit.build(MMDIT), args, dict(capture=AttnCapture(blocks=(0, -1)), taca=TACA())


def _clip_case():
    ids = np.random.RandomState(0).randint(0, 63, (2, 16))
    ids[:, 9] = 63  # EOS
    return clip.build(CLIP), (jnp.asarray(ids),), dict(output_hidden_states=True)


def _t5_case():
    ids = np.random.RandomState(0).randint(0, 64, (2, 40))  # reaches the log-spaced buckets
    return t5.build(T5), (jnp.asarray(ids),), dict(output_hidden_states=True)


CASES = {"unet": _unet_case, "mmdit": _mmdit_case, "clip": _clip_case, "t5": _t5_case}
# Both attention paths, each with its custom gradient, once: the explicit one (CPU default) in the
# UNet, the fused one with maps rebuilt from the log-sum-exp (GPU/TPU default) in the MM-DiT.
VARIANTS = [("unet", "explicit"), ("mmdit", "fused"), ("clip", "auto"), ("t5", "auto")]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def case(request) -> SimpleNamespace:
    """A model without remat, its inputs, random params, and its outputs and gradients.

    `run(module, params)` is the forward pass (denoisers: `{"pred", "maps"}`; text encoders: their
    output dict); `init(module)` the parameter tree that module creates.
    """
    name, implementation = request.param
    module, args, kwargs = CASES[name]()
    module = module.clone(implementation=implementation)

    def run(m, p):
        out = m.apply({"params": p}, *args, **kwargs)
        return {"pred": out[0], "maps": out[1]["attn"]} if isinstance(out, tuple) else out

    def init(m):
        return m.init(jax.random.key(0), *args, **kwargs)["params"]

    params = random_params(jax.eval_shape(lambda: init(module)), 0)
    out, grads = _outputs_and_grads(run, module, params)
    return SimpleNamespace(module=module, run=run, init=init, params=params, out=out, grads=grads)


def _loss(run, module, with_outputs: bool = False):
    """A scalar touching every output (and map) with fixed random weights, so no gradient vanishes by
    symmetry; `(scalar, outputs)` when `with_outputs`."""
    def loss(params):
        outs = run(module, params)
        leaves = jax.tree.leaves(outs)
        weights = [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
        value = sum(jnp.vdot(w, x) / math.sqrt(x.size) for w, x in zip(weights, leaves))
        return (value, outs) if with_outputs else value
    return loss


def _outputs_and_grads(run, module, params):
    """The forward pass's outputs and the loss gradient, from one compiled function."""
    grads, outs = jax.jit(jax.grad(_loss(run, module, with_outputs=True), has_aux=True))(params)
    return outs, grads


@pytest.mark.parametrize("policy", POLICY_PARAMS)
def test_same_params_outputs_maps_and_gradients(case, policy):
    rematted = case.module.clone(remat=policy)
    # The same parameter tree: paths, shapes, dtypes.
    assert jax.eval_shape(lambda: case.init(rematted)) == jax.eval_shape(lambda: case.init(case.module))

    out, grads = _outputs_and_grads(case.run, rematted, case.params)
    assert jax.tree.structure(out) == jax.tree.structure(case.out)
    for ours, ref in zip(jax.tree.leaves(out), jax.tree.leaves(case.out)):
        assert rel_err(ours, ref) <= 1e-6
    # 1e-5 of each leaf's largest gradient, plus 1e-6 of the largest of all: some gradients are zero in
    # exact arithmetic and rounding noise (~1e-7) here, e.g. CLIP's key biases (the softmax ignores a
    # per-query constant) and the text queries of the last MM-DiT block (its text output is dropped).
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(case.grads))
    for (path, ref), ours in zip(jax.tree_util.tree_flatten_with_path(case.grads)[0], jax.tree.leaves(grads)):
        err, scale = np.abs(np.asarray(ours) - np.asarray(ref)).max(), np.abs(ref).max()
        assert err <= 1e-5 * scale + 1e-6 * largest, (jax.tree_util.keystr(path), err, scale)


def test_remat_keeps_fewer_activations(case):
    """What the forward pass saves for the backward (traced: independent of the backend's scheduler):
    "full" keeps only block inputs and outputs, "dots" adds the matmul outputs, "none" keeps everything."""
    kept = {policy: remat_lib.kept_bytes(_loss(case.run, case.module.clone(remat=policy)), case.params)
            for policy in ["none", *POLICIES]}
    assert kept["full"] < kept["none"] and kept["dots"] < kept["none"], kept
    assert kept["full"] <= kept["dots"], kept
    jaxpr = jax.make_jaxpr(_loss(case.run, case.module.clone(remat="full")))(case.params)
    assert any(eqn.primitive.name == "remat2" for eqn in jaxpr.eqns)


def test_unknown_policy_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'dots', 'full', 'none'"):
        remat_lib.check("selective")
    module, args, kwargs = _clip_case()
    with pytest.raises(ValueError, match="remat='everything'"):
        jax.eval_shape(lambda: module.clone(remat="everything").init(jax.random.key(0), *args, **kwargs))
    encoders = PromptEncoders("sd", {}, {"text_encoder": module}, {"text_encoder": 16})
    with pytest.raises(ValueError, match="remat='offload'"):
        with_remat(encoders, "offload")
    assert with_remat(encoders, "full").models["text_encoder"].remat == "full"


def _count_remat(jaxpr) -> int:
    """`remat2` equations in a jaxpr and every jaxpr nested in it."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "remat2"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    count += _count_remat(getattr(sub, "jaxpr", sub))
    return count


@pytest.mark.parametrize("family", ["sd2", "sd3"])
def test_families_apply_remat_to_the_models_they_run(family):
    """The CTCAL step built with `make_family(..., remat=...)` runs rematerialised blocks (traced only)."""
    import step_setup

    counts = {}
    for policy in ("none", "full"):
        s = step_setup.setup(family, remat=policy)
        batch = step_setup.batch(family, batch_size=2)
        counts[policy] = _count_remat(jax.make_jaxpr(s.step.jitted)(s.frozen, s.state, batch, jax.random.key(0)).jaxpr)
    assert counts["none"] == 0 and counts["full"] > 0, counts
