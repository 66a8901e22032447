"""Bad arguments at the models' boundaries: one-line ValueErrors naming the argument (checked while
tracing), never an error from inside einsum, a convolution or Flax."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ctcal_jax import sampling
from ctcal_jax.attention import TACA, AttnCapture


@pytest.fixture(scope="module")
def sd2():
    return sampling.load_pipeline("builtin:tiny-sd2")


@pytest.fixture(scope="module")
def sd3():
    return sampling.load_pipeline("builtin:tiny-sd3")


def one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message and len(message) <= 400, message
    for needle in needles:
        assert needle in message, message


def unet(pipe, sample, t, context, **kw):
    return pipe.denoiser.apply({"params": pipe.params["unet"]}, sample, t, context, **kw)


def mmdit(pipe, x, t, context, pooled, **kw):
    return pipe.denoiser.apply({"params": pipe.params["transformer"]}, x, t, context, pooled, **kw)


Z2, C2 = jnp.zeros((2, 32, 32, 4)), jnp.zeros((2, 77, 64))
Z3, C3, P3 = jnp.zeros((2, 32, 32, 16)), jnp.zeros((2, 333, 64)), jnp.zeros((2, 48))


@pytest.mark.parametrize("sample,t,context,needles", [
    (Z2, 10.0, jnp.zeros((3, 77, 64)), ("encoder_hidden_states has batch 3", "sample has batch 2")),
    (Z2, 10.0, jnp.zeros((1, 77, 64)), ("encoder_hidden_states has batch 1",)),
    (jnp.zeros((2, 4, 32, 32)), 10.0, C2, ("sample must have 4 entries on its last axis", "NHWC")),
    (Z2, jnp.zeros(3), C2, ("timesteps must be a scalar or one per sample",)),
    (Z2, 10.0, jnp.zeros((2, 77, 32)), ("encoder_hidden_states must have 64 entries",)),
    (jnp.zeros((32, 32, 4)), 10.0, C2, ("sample must have 4 axes",)),
])
def test_unet_arguments(sd2, sample, t, context, needles):
    with pytest.raises(ValueError) as e:
        unet(sd2, sample, t, context)
    one_line(e, "UNet2DConditionModel", *needles)


@pytest.mark.parametrize("x,context,pooled,needles", [
    (Z3, jnp.zeros((3, 333, 64)), P3, ("encoder_hidden_states has batch 3",)),
    (Z3, C3, jnp.zeros((1, 48)), ("pooled_projections has batch 1",)),
    (jnp.zeros((2, 16, 32, 32)), C3, P3, ("hidden_states must have 16 entries", "NHWC")),
    (Z3, C3, jnp.zeros((2, 32)), ("pooled_projections must have 48 entries",)),
])
def test_mmdit_arguments(sd3, x, context, pooled, needles):
    with pytest.raises(ValueError) as e:
        mmdit(sd3, x, 500.0, context, pooled)
    one_line(e, "SD3Transformer2DModel", *needles)


def test_capture_and_taca_arguments(sd3):
    with pytest.raises(ValueError) as e:
        AttnCapture(resolutions=16)
    one_line(e, "resolutions must be a tuple of ints")
    assert AttnCapture(resolutions=[16, 8]).resolutions == (16, 8)
    for gamma in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError) as e:
            TACA(gamma=gamma)
        one_line(e, "TACA: gamma must be a finite number > 0")
    with pytest.raises(ValueError) as e:
        mmdit(sd3, Z3, 500.0, C3, P3, taca=1.2)
    one_line(e, "taca must be a TACA")


def test_text_and_vae_arguments(sd2):
    clip = sd2.encoders.models["text_encoder"]
    with pytest.raises(ValueError) as e:
        clip.apply({"params": sd2.params["text_encoder"]}, jnp.zeros((2, 77), jnp.float32))
    one_line(e, "input_ids must be integer token ids")
    with pytest.raises(ValueError) as e:
        clip.apply({"params": sd2.params["text_encoder"]}, jnp.zeros((1, 100), jnp.int32))
    one_line(e, "100 tokens, more than the model's 77 positions")
    with pytest.raises(ValueError) as e:
        sd2.vae.apply({"params": sd2.params["vae"]}, np.zeros((1, 3, 64, 64), np.float32), method="encode")
    one_line(e, "images must have 3 entries on its last axis")
    with pytest.raises(ValueError) as e:
        sd2.vae.apply({"params": sd2.params["vae"]}, np.zeros((1, 8, 8, 16), np.float32), method="decode")
    one_line(e, "latents must have 4 entries")


def test_iterref_arguments():
    from ctcal_jax import iterref

    attn = jnp.ones((2, 8, 8, 77)) / 77
    with pytest.raises(ValueError) as e:
        iterref.batch_loss(attn, jnp.zeros((3, 2, 77)))
    one_line(e, "token_groups weights must be [G, 77] or [2, G, 77]")
    with pytest.raises(ValueError) as e:
        iterref.batch_loss(attn, [[1]], jnp.ones((2, 76), bool))
    one_line(e, "token_mask must have 77 entries")
    with pytest.raises(ValueError) as e:
        iterref.refine(lambda z, t: (z, {"attn": z}), jnp.zeros((1, 8, 8)), 500.0, [[1]], lr=0.1)
    one_line(e, 'aux["attn"] must have 4 axes')


def test_the_arrays_given_to_init_state_survive_a_donating_step():
    """The train step donates its state; the trainable tree the user passed in stays usable."""
    import jax
    import optax

    from ctcal_jax.train_step import init_state

    params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    state = init_state(params, optax.adam(1e-3))
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    state = step(state)
    assert float(params["w"].sum()) == 16.0 and float(state["params"]["w"].sum()) == 32.0


def test_map_autoencoder_mismatches():
    import jax

    from ctcal_jax import ctcal

    cfg = ctcal.CTCALConfig()
    maps = jnp.ones((1, 16, 16, 77)) / 77
    weights = jnp.zeros((1, 2, 77)).at[0, 0, 1].set(1.0)
    mask = jnp.zeros((1, 77), bool).at[0, 1:4].set(True)
    with pytest.raises(ValueError) as e:
        ctcal.ctcal_terms(maps, maps, weights, mask, ctcal.init_autoencoder(jax.random.key(0), 32), cfg)
    one_line(e, "built for 32×32 maps", "captured maps are 16×16")
    with pytest.raises(ValueError) as e:
        ctcal.ctcal_terms(maps, maps, weights, mask, None, cfg)
    one_line(e, 'the semantic terms (config.semantic) need the map autoencoder')
    loss, _ = ctcal.ctcal_terms(maps, maps, weights, mask, ctcal.init_autoencoder(jax.random.key(0), 16), cfg)
    assert np.isfinite(np.asarray(loss)).all()


@pytest.mark.parametrize("key,value,needles", [
    ("lora.rank", 0, ["config.lora.rank=0", "at least 1"]),
    ("lora.alpha", -4.0, ["config.lora.alpha=-4.0"]),
    ("optim.groups", ((r".*", -1e-3, 0.0),), ["config.optim.groups", "lr ≥ 0", "group 0"]),
    ("optim.groups", (), ["at least one"]),
    ("optim.accum_steps", 0, ["config.optim.accum_steps=0"]),
    ("batch_size", 0, ["config.batch_size=0"]),
    ("taca.gamma", float("nan"), ["config.taca.gamma=nan", "> 0"]),
    ("taca.gamma", 0.0, ["config.taca.gamma=0.0"]),
    ("flow.guidance", float("inf"), ["config.flow.guidance=inf", "guidance scale"]),
    ("ctcal.lambdas", (0.01, 1.0, -1.0, 0.1), ["config.ctcal.lambdas", "≥ 0"]),
    ("ctcal.teacher_t", 2000.0, ["config.ctcal.teacher_t=2000.0", "num_train_timesteps=1000"]),
])
def test_config_values_a_run_cannot_start_with(key, value, needles):
    """`builder.build` refuses them with the key's name, before any model is touched."""
    from ctcal_jax import builder
    from ctcal_jax import config as config_lib

    c = config_lib.base_config()
    section, name = key.split(".") if "." in key else (None, key)
    (c[section] if section else c)[name] = value
    with pytest.raises(ValueError) as e:
        builder.build(c, pipeline=None)
    one_line(e, *needles)
    config_lib.check(config_lib.base_config())  # the defaults pass


def test_train_batch_arguments():
    """The step's batch is checked while tracing: missing keys, a lacking text encoder, mixed batch
    sizes and a token-axis mismatch name the key (the models' own checks cover the latents' layout)."""
    from ctcal_jax import checks

    streams = {"clip": (slice(None), "noun_weights", "token_mask")}
    good = {"latents": np.zeros((2, 8, 8, 4)), "input_ids": {"text_encoder": np.zeros((2, 77), np.int32)},
            "noun_weights": np.zeros((2, 3, 77)), "token_mask": np.zeros((2, 77), bool)}
    check = lambda b: checks.train_batch(b, text_inputs=("text_encoder",), streams=streams)  # noqa: E731
    check(good)
    cases = [
        ({k: v for k, v in good.items() if k != "latents"}, ["expected 'latents'", "or 'images'"]),
        ({k: v for k, v in good.items() if k != "input_ids"}, ["expected 'input_ids'", "no such key"]),
        ({**good, "input_ids": {"text_encoder_2": good["input_ids"]["text_encoder"]}},
         ["input_ids lacks text_encoder", "has text_encoder_2"]),
        ({k: v for k, v in good.items() if k != "noun_weights"}, ["reads 'noun_weights'"]),
        ({**good, "latents": np.zeros((3, 8, 8, 4))}, ["same batch size", "latents 3", "noun_weights 2"]),
        ({**good, "token_mask": np.zeros((2, 76), bool)}, ["same token axis T"]),
        ({**good, "reward": np.zeros((2, 1))}, ["reward must have 1 axes"]),
        ({k: v for k, v in good.items() if k != "latents"} | {"images": np.zeros((2, 16, 16, 4))},
         ["images must have 3 entries on its last axis"]),
    ]
    for batch, needles in cases:
        with pytest.raises(ValueError) as e:
            check(batch)
        one_line(e, *needles)
    # SD3: precomputed T5 embeddings stand in for T5's token ids.
    sd3 = {**good, "input_ids": {"text_encoder": good["input_ids"]["text_encoder"]}, "t5_embeds": np.zeros((2, 256, 8))}
    checks.train_batch(sd3, text_inputs=("text_encoder", "text_encoder_3"), streams=streams)
