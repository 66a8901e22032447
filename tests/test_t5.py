"""T5 encoder against transformers' `T5EncoderModel` with the same random weights (gated-gelu as in
T5 v1.1 / SD3, and plain relu), and the relative-position buckets against transformers' function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from conversion import files, load_component, names
from ctcal_jax.models.t5 import relative_position_bucket
from tests.tiny import randomize, rel_err, save

FEED_FORWARD = {"gated": "gated-gelu", "relu": "relu"}


@pytest.fixture(scope="module", params=list(FEED_FORWARD))
def case(request, tmp_path_factory):
    # d_kv · heads != d_model and a 40-token input that reaches the log-spaced buckets.
    config = T5Config(vocab_size=160, d_model=24, d_kv=6, d_ff=40, num_layers=3, num_heads=3,
                      feed_forward_proj=FEED_FORWARD[request.param], relative_attention_num_buckets=16,
                      relative_attention_max_distance=24)
    torch.manual_seed(0)
    model = T5EncoderModel(config).eval()
    randomize(model, scale=0.2)
    folder = save(model, tmp_path_factory.mktemp(request.param))
    ids = np.random.RandomState(0).randint(0, 160, (2, 40))
    with torch.no_grad():
        ref = model(torch.tensor(ids), output_hidden_states=True)
    return model, folder, ids, ref


@pytest.mark.parametrize("implementation", ["fused", "explicit"])
def test_parity_fp32(case, implementation):
    _, folder, ids, ref = case
    module, params = load_component(folder, "text_encoder_3")
    out = module.clone(implementation=implementation).apply({"params": params}, jnp.asarray(ids),
                                                            output_hidden_states=True)
    assert rel_err(out["last_hidden_state"], ref.last_hidden_state) <= 1e-4
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        assert rel_err(ours, theirs) <= 1e-4
    assert "pooled" not in out


def test_parameter_names_round_trip(case):
    model, folder, _, _ = case
    _, params = load_component(folder, "text_encoder_3")
    exported = names.flax_to_torch(params)
    # transformers ties encoder.embed_tokens to shared: one parameter here.
    assert set(exported) == set(model.state_dict()) - {"encoder.embed_tokens.weight"}
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in exported
    assert not any("relative_attention_bias" in k for k in exported if k.startswith("encoder.block.1."))


def test_tied_embedding_key_alone(case, tmp_path):
    """A checkpoint that stores only `encoder.embed_tokens.weight` fills `shared`."""
    _, folder, ids, ref = case
    state, _ = files.read_safetensors(folder / "model.safetensors")
    state = {k: np.asarray(v) for k, v in state.items()}
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    files.write_safetensors(tmp_path / "model.safetensors", state)
    module, params = load_component(tmp_path, "text_encoder_3")
    assert rel_err(module.apply({"params": params}, jnp.asarray(ids))["last_hidden_state"], ref.last_hidden_state) <= 1e-4


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 24), (8, 20)])
def test_relative_position_bucket(num_buckets, max_distance):
    offsets = np.arange(-600, 601)
    ours = relative_position_bucket(offsets, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(torch.tensor(offsets), True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_relative_position_bucket_values():
    """Hand-computed: 32 buckets, max distance 128 -> 16 per direction (keys after the query get
    +16), offsets 0..7 exact, then n -> 8 + floor(8·log(n/8)/log(16)), capped at 15."""
    offsets = np.array([0, 1, 7, 8, 12, 16, 127, 128, 1000, -1, -8, -1000])
    # n=12: 8·log(1.5)/log(16) = 1.17 -> 9; n=16: 2 -> 10; n=127: 7.98 -> 15.
    expected = np.array([0, 16 + 1, 16 + 7, 16 + 8, 16 + 9, 16 + 10, 16 + 15, 16 + 15, 16 + 15, 1, 8, 15])
    np.testing.assert_array_equal(relative_position_bucket(offsets), expected)


@pytest.mark.slow
def test_full_width(tmp_path):
    """SD3's T5 v1.1 XXL widths (one block, small vocabulary) on 256 tokens."""
    config = T5Config(vocab_size=1000, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                      feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = T5EncoderModel(config).eval()
    folder = save(model, tmp_path)
    ids = np.random.RandomState(0).randint(0, 1000, (1, 256))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).last_hidden_state
    module, params = load_component(folder, "text_encoder_3")
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))["last_hidden_state"]
    assert rel_err(out, ref) <= 1e-4
