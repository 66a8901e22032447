"""CLIP text encoders against transformers with the same random weights: SD 1.x-like (quick_gelu,
legacy eos_token_id=2), SD 2.x-like (gelu, "!" padding) and SD3-like projected models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conversion import files, load_component, names
from ctcal_jax.models.clip import eos_positions
from tests.tiny import randomize, real_clip_tokenizer, rel_err, save

PROMPTS = ["a giraffe next to a traffic light", "", "two red apples, a banana and a bowl on a wooden table"]

CONFIGS = {
    "sd1": (CLIPTextModel, dict(hidden_act="quick_gelu", eos_token_id=2), "<|endoftext|>"),
    "sd2": (CLIPTextModel, dict(hidden_act="gelu", eos_token_id=49407), "!"),
    "projected": (CLIPTextModelWithProjection, dict(hidden_act="gelu", eos_token_id=49407, projection_dim=24), "!"),
}


def _torch_model(kind: str, seed: int = 0):
    cls, kwargs, pad = CONFIGS[kind]
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                            pad_token_id=1, **kwargs)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed, scale=0.1)
    return model, real_clip_tokenizer(pad_token=pad)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    model, tokenizer = _torch_model(request.param)
    folder = save(model, tmp_path_factory.mktemp(request.param))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    with torch.no_grad():
        ref = model(torch.tensor(ids), output_hidden_states=True)
    return request.param, model, folder, ids, ref


def _pooled(ref):
    return ref.text_embeds if hasattr(ref, "text_embeds") else ref.pooler_output


@pytest.mark.parametrize("implementation", ["fused", "explicit"])
def test_parity_fp32(case, implementation):
    _, _, folder, ids, ref = case
    module, params = load_component(folder, "text_encoder")
    module = module.clone(implementation=implementation)
    out = module.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    assert rel_err(out["last_hidden_state"], ref.last_hidden_state) <= 1e-4
    assert rel_err(out["pooled"], _pooled(ref)) <= 1e-4
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        assert rel_err(ours, theirs) <= 1e-4
    assert set(module.apply({"params": params}, jnp.asarray(ids))) == {"last_hidden_state", "pooled"}


def test_parity_bf16(case):
    _, _, folder, ids, ref = case
    module, params = load_component(folder, "text_encoder", compute_dtype=jnp.bfloat16)
    out = jax.jit(lambda p, i: module.apply({"params": p}, i, output_hidden_states=True))(params, jnp.asarray(ids))
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    assert rel_err(out["last_hidden_state"], ref.last_hidden_state) <= 2e-2
    assert rel_err(out["hidden_states"][-2], ref.hidden_states[-2]) <= 2e-2
    assert rel_err(out["pooled"], _pooled(ref)) <= 2e-2


def test_parameter_names_round_trip(case):
    """Flax paths map back to the transformers module paths the LoRA code targets."""
    kind, model, folder, _, _ = case
    _, params = load_component(folder, "text_encoder")
    exported = names.flax_to_torch(params)
    expected = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
                for k in model.state_dict()}
    assert set(exported) == expected
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in exported
    state = model.state_dict()
    key = "text_model.encoder.layers.1.self_attn.out_proj.weight"
    np.testing.assert_array_equal(exported[key], state.get(key, state.get(key.removeprefix("text_model."))).numpy())
    if kind == "projected":
        assert exported["text_projection.weight"].shape == (24, 32)


def test_legacy_keys_with_prefix_and_position_ids(tmp_path):
    """Older checkpoints: `text_model.` prefix on a CLIPTextModel and the `position_ids` buffer."""
    model, _ = _torch_model("sd1", seed=1)
    folder = save(model, tmp_path / "new")
    state, _ = files.read_safetensors(folder / "model.safetensors")
    # (transformers 5.0 still saves the prefix itself; later releases drop it)
    legacy = {"text_model." + k.removeprefix("text_model."): np.asarray(v) for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((folder / "config.json").read_text())
    files.write_safetensors(old / "model.safetensors", legacy)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 49408, (2, 77)))
    module, p_new = load_component(folder, "text_encoder")
    _, p_old = load_component(old, "text_encoder")
    np.testing.assert_array_equal(module.apply({"params": p_new}, ids)["pooled"],
                                  module.apply({"params": p_old}, ids)["pooled"])


def test_eos_positions():
    ids = jnp.asarray([[49406, 320, 49407, 49407, 49407],   # SD 1.x padding: EOS repeated
                       [49406, 49407, 0, 0, 0],             # "!" padding
                       [320, 5000, 321, 322, 323]])         # no EOS at all
    np.testing.assert_array_equal(eos_positions(ids, 49407), [2, 1, 0])
    # Legacy configs take the largest id: the first EOS, or else the largest ordinary token.
    np.testing.assert_array_equal(eos_positions(ids, 2), [2, 1, 1])


FULL_SIZE = {  # the text encoders of SD 1.x (OpenAI CLIP-L) and SD 2.x (OpenCLIP ViT-H)
    "clip-l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", eos_token_id=2),
    "openclip-h": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       hidden_act="gelu", eos_token_id=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size(name, tmp_path):
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **FULL_SIZE[name])).eval()
    randomize(model, scale=0.01)
    folder = save(model, tmp_path)
    ids = real_clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="np").input_ids
    with torch.no_grad():
        ref = model(torch.tensor(ids), output_hidden_states=True)
    module, params = load_component(folder, "text_encoder")
    out = jax.jit(lambda p, i: module.apply({"params": p}, i, output_hidden_states=True))(params, jnp.asarray(ids))
    assert rel_err(out["last_hidden_state"], ref.last_hidden_state) <= 1e-4
    assert rel_err(out["hidden_states"][-2], ref.hidden_states[-2]) <= 1e-4
    assert rel_err(out["pooled"], ref.pooler_output) <= 1e-4
