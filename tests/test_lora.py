"""ctcal_jax.lora: target selection, the merge formula, dtypes, jit, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conversion import unet as unet_family
from ctcal_jax import lora

TINY_UNET = {
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32,
}


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "transformer_blocks_0": {"attn1": {"to_q": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), dtype)},
                               "to_out_0": {"kernel": jnp.asarray(rng.normal(size=(5, 6)), dtype),
                                            "bias": jnp.asarray(rng.normal(size=(6,)), dtype)}},
                     "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), dtype)}},
        "norm": {"scale": jnp.ones((6,), dtype)},
    }


def _random(lp, seed=1):
    """The adapters of `lp` with random non-zero A and B."""
    rng = np.random.default_rng(seed)
    return {m: {"A": jnp.asarray(rng.normal(size=ab["A"].shape), jnp.float32),
                "B": jnp.asarray(rng.normal(size=ab["B"].shape), jnp.float32), "alpha": ab["alpha"]}
            for m, ab in lp.items()}


def test_init_targets_unet_attention_projections():
    module = unet_family.build(TINY_UNET)
    params = unet_family.abstract_params(module, TINY_UNET)
    lp = lora.init(jax.random.key(0), params, rank=3, alpha=2.0)
    attentions = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
                  "up_blocks.1.attentions.1"]
    expected = {f"{a}.transformer_blocks.0.{attn}.{p}" for a in attentions for attn in ("attn1", "attn2")
                for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert set(lp) == expected
    ab = lp["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]  # context 32 -> 64 channels
    assert ab["A"].shape == (32, 3) and ab["B"].shape == (3, 64) and ab["A"].dtype == jnp.float32
    assert float(ab["alpha"]) == 2.0 and not np.any(ab["B"])
    bound = 1 / np.sqrt(32)  # peft's kaiming-uniform(a=sqrt(5)) bound for fan-in 32
    assert bound / 2 < np.abs(ab["A"]).max() <= bound


def test_init_zero_b_leaves_params_unchanged():
    params = _params()
    merged = lora.merge(params, lora.init(jax.random.key(0), params, targets=r"to_q|to_out\.0"))
    jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_init_errors_name_the_regex():
    params = _params()
    with pytest.raises(ValueError, match=r"no_such_layer"):
        lora.init(jax.random.key(0), params, targets="no_such_layer")
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.conv"):
        lora.init(jax.random.key(0), params, targets="conv|to_q")


def test_merge_formula_dtype_and_jit():
    params = _params()
    lp = _random(lora.init(jax.random.key(0), params, targets=r"to_q|to_out\.0", rank=2, alpha=3.0))
    lp["transformer_blocks.0.attn1.to_q"]["alpha"] = jnp.float32(0.5)
    merged = lora.merge(params, lp)
    for module, path, alpha in (("transformer_blocks.0.attn1.to_q", "to_q", 0.5),
                                ("transformer_blocks.0.attn1.to_out.0", "to_out_0", 3.0)):
        a, b = (np.asarray(lp[module][k], np.float64) for k in "AB")
        want = np.asarray(params["transformer_blocks_0"]["attn1"][path]["kernel"], np.float64) + alpha / 2 * a @ b
        np.testing.assert_allclose(merged["transformer_blocks_0"]["attn1"][path]["kernel"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged["transformer_blocks_0"]["attn1"]["to_out_0"]["bias"],
                                  params["transformer_blocks_0"]["attn1"]["to_out_0"]["bias"])
    jitted = jax.jit(lora.merge)(params, lp)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), jitted, merged)

    params16 = _params(jnp.bfloat16)
    merged16 = lora.merge(params16, lp)
    assert jax.tree.map(lambda x: x.dtype, merged16) == jax.tree.map(lambda x: x.dtype, params16)
    want = lora.merge(jax.tree.map(lambda x: x.astype(jnp.float32), params16), lp)
    np.testing.assert_array_equal(merged16["transformer_blocks_0"]["attn1"]["to_q"]["kernel"],
                                  want["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].astype(jnp.bfloat16))


def test_merge_gradients_reach_a_and_b_not_alpha():
    params = _params()
    lp = _random(lora.init(jax.random.key(0), params, targets="to_q"))

    def loss(lp):
        return jnp.sum(lora.merge(params, lp)["transformer_blocks_0"]["attn1"]["to_q"]["kernel"] ** 2)

    grads = jax.grad(loss)(lp)["transformer_blocks.0.attn1.to_q"]
    assert np.abs(grads["A"]).min() > 0 and np.abs(grads["B"]).min() > 0
    assert float(grads["alpha"]) == 0.0


def test_merge_errors_name_the_modules():
    params = _params()
    lp = _random(lora.init(jax.random.key(0), params, targets="to_q"))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1\.to_k: no Dense kernel"):
        lora.merge(params, {**lp, "transformer_blocks.0.attn1.to_k": lp["transformer_blocks.0.attn1.to_q"]})
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1\.to_out\.0: A \(6, 4\)"):
        lora.merge(params, {"transformer_blocks.0.attn1.to_out.0": lp["transformer_blocks.0.attn1.to_q"]})
