"""FLUX.1 transformer: parity with diffusers' `FluxTransformer2DModel`, captured maps, TACA, LoRA, loading.

References:
- prediction: diffusers' own forward (its attention processor), fed as FluxPipeline feeds it: latents
  packed with `FluxPipeline._pack_latents`, positions from `_prepare_latent_image_ids` and zero text
  ids, `timestep = t / 1000`, and the output unpacked with `_unpack_latents`;
- maps and TACA: the same diffusers model with `FluxProbsProcessor`, which forms the joint softmax
  explicitly (text first, then image; RoPE by diffusers' `apply_rotary_emb`), multiplies the
  image-query × text-key logits by a per-sample γ and records that block's head-mean probabilities.
"""

from __future__ import annotations

import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conversion import flux as flux_conversion  # noqa: E402
from conversion import known, load_component, names  # noqa: E402
from ctcal_jax import attention as attn_lib  # noqa: E402
from ctcal_jax import lora  # noqa: E402
from ctcal_jax.attention import TACA, AttnCapture  # noqa: E402
from ctcal_jax.models.flux import FluxTransformer2DModel, image_ids  # noqa: E402
from ctcal_jax.paths import join_path  # noqa: E402
from tests.tiny import model_cache, nchw, nhwc, rel_err, save  # noqa: E402

# Tiny configs; sizes differ between them (heads, head dims, RoPE split, out ≠ in channels) so that a
# swapped axis or chunk order cannot pass by symmetry. Latent channels are in_channels / 4.
CONFIGS = {
    "dev": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6)),
    "schnell": dict(patch_size=1, in_channels=16, out_channels=24, num_layers=1, num_single_layers=2,
                    attention_head_dim=8, num_attention_heads=3, joint_attention_dim=20, pooled_projection_dim=8,
                    guidance_embeds=False, axes_dims_rope=(2, 2, 4)),
}
T_TXT = 5
# t/1000 and back is exact in float32 for these (diffusers divides and multiplies by 1000); sample 0
# is above the TACA threshold (970), sample 1 below.
TIMESTEPS = np.array([984.375, 500.0], np.float32)
GAMMA = 1.5


class FluxProbsProcessor:
    """diffusers' `FluxAttnProcessor` with the softmax formed explicitly: image-query × text-key
    logits multiplied by `gamma` (one value per sample) when set, and the head-mean probabilities of
    that block (`[B, N, T]`) appended to `store`. Single-stream blocks get the joint sequence without
    the text length, so it is given here."""

    def __init__(self, store: list, text_len: int, gamma=None):
        self.store, self.text_len, self.gamma = store, text_len, gamma

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))  # [B, L, N, Dh]

        q, k = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            c = encoder_hidden_states
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(c))), q], 1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(c))), k], 1)
            v = torch.cat([heads(attn.add_v_proj(c)), v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1).transpose(1, 2)  # [B, N, L, Dh]
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        t = self.text_len
        if self.gamma is not None:
            logits[:, :, t:, :t] = logits[:, :, t:, :t] * self.gamma.reshape(-1, 1, 1, 1)
        probs = logits.softmax(-1)
        self.store.append(probs[:, :, t:, :t].mean(1).numpy())
        out = (probs @ v.transpose(1, 2)).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


def torch_forward(model, x, t, ctx, pooled, guidance=None, *, record: bool = False, gamma=None):
    """diffusers forward on NHWC numpy latents, as FluxPipeline calls it -> (pred NHWC, per-block maps).

    With `record` or `gamma`, every attention runs `FluxProbsProcessor` (maps: double blocks, then
    single blocks, as our block indices)."""
    from diffusers import FluxPipeline

    b, height, width, c = x.shape
    store: list = []
    default = dict(model.attn_processors)
    if record or gamma is not None:
        g = None if gamma is None else torch.as_tensor(np.asarray(gamma, np.float32))
        model.set_attn_processor({name: FluxProbsProcessor(store, ctx.shape[1], g) for name in default})
    packed = FluxPipeline._pack_latents(torch.from_numpy(nchw(x)), b, c, height, width)
    try:
        with torch.no_grad():
            out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(ctx),
                        pooled_projections=torch.from_numpy(pooled),
                        timestep=torch.from_numpy(np.asarray(t, np.float32) / np.float32(1000)),
                        img_ids=FluxPipeline._prepare_latent_image_ids(b, height // 2, width // 2, "cpu",
                                                                       torch.float32),
                        txt_ids=torch.zeros(ctx.shape[1], 3),
                        guidance=None if guidance is None else torch.from_numpy(guidance)).sample
    finally:
        model.set_attn_processor(default)
    pred = FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)  # vae_scale_factor 8
    return nhwc(pred.numpy()), store


def make_inputs(name: str, height: int = 8, width: int = 12, seed: int = 0):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, height, width, cfg["in_channels"] // 4)).astype(np.float32)
    ctx = rng.standard_normal((2, T_TXT, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, cfg["pooled_projection_dim"])).astype(np.float32)
    guidance = np.array([3.5, 5.0], np.float32) if cfg["guidance_embeds"] else None
    return x, TIMESTEPS, ctx, pooled, guidance


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (torch model, folder, flax module, params), built on first use."""
    from diffusers import FluxTransformer2DModel as TorchFlux

    return model_cache(TorchFlux, CONFIGS, tmp_path_factory)


_JITTED: dict = {}


def _apply(module, params, inputs, **kw):
    """`module.apply` on `(x, t, ctx, pooled, guidance)`, one compiled function per module and keywords."""
    key = (id(module), repr(sorted(kw.items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(partial(module.apply, **kw))
    x, t, ctx, pooled, guidance = inputs
    return _JITTED[key]({"params": params}, x, t, ctx, pooled, guidance=guidance)


def _maps(blocks, shape):
    return np.mean(blocks, axis=0).reshape(shape)


@pytest.mark.parametrize("name,height,width", [("dev", 8, 8), ("dev", 8, 12), ("schnell", 12, 8)])
def test_parity_fp32(models, name, height, width):
    ref, _, module, params = models(name)
    inputs = make_inputs(name, height, width)
    want, _ = torch_forward(ref, *inputs)
    want_rec, blocks = torch_forward(ref, *inputs, record=True)
    assert rel_err(want_rec, want) < 1e-5  # the recording processor is the same attention
    assert len(blocks) == CONFIGS[name]["num_layers"] + CONFIGS[name]["num_single_layers"]

    pred, aux = _apply(module, params, inputs, capture=AttnCapture())
    assert pred.shape == want.shape == (2, height, width, module.out_channels)
    assert np.abs(np.asarray(pred) - want).max() < 1e-4
    assert rel_err(pred, want) < 1e-4
    assert aux["attn"].shape == (2, height // 2, width // 2, T_TXT)
    assert np.abs(np.asarray(aux["attn"]) - _maps(blocks, aux["attn"].shape)).max() < 1e-5


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_parity_fp32_taca(models, name):
    """Per-sample γ: sample 0 (t=984.4 ≥ 970) gets γ=1.5, sample 1 (t=500) plain attention."""
    ref, _, module, params = models(name)
    inputs = make_inputs(name)
    want, blocks = torch_forward(ref, *inputs, gamma=np.where(inputs[1] >= 970.0, GAMMA, 1.0))
    plain, _ = torch_forward(ref, *inputs)

    pred, aux = _apply(module, params, inputs, capture=AttnCapture(), taca=TACA(GAMMA, 970.0))
    assert np.abs(np.asarray(pred) - want).max() < 1e-4
    assert np.abs(np.asarray(aux["attn"]) - _maps(blocks, aux["attn"].shape)).max() < 1e-5
    # TACA matters for the sample above the threshold; below it, it is TACA off.
    assert rel_err(want[0], plain[0]) > 1e-3
    pred_off, aux_off = _apply(module, params, inputs, capture=AttnCapture())
    assert rel_err(pred[1], pred_off[1]) < 1e-6
    assert rel_err(aux["attn"][1], aux_off["attn"][1]) < 1e-6


def test_packed_tokens_as_diffusers_takes_them(models):
    """API form: packed `[B, N, 64]` tokens with `img_ids`/`txt_ids` -> packed prediction; maps on the
    grid the (concrete) `img_ids` span."""
    from diffusers import FluxPipeline

    ref, _, module, params = models("dev")
    x, t, ctx, pooled, guidance = make_inputs("dev")
    packed = FluxPipeline._pack_latents(torch.from_numpy(nchw(x)), 2, x.shape[-1], 8, 12).numpy()
    ids, txt = image_ids(4, 6), np.zeros((T_TXT, 3), np.float32)
    np.testing.assert_array_equal(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32).numpy())
    with torch.no_grad():
        want = ref(hidden_states=torch.from_numpy(packed), encoder_hidden_states=torch.from_numpy(ctx),
                   pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t / np.float32(1000)),
                   img_ids=torch.from_numpy(ids), txt_ids=torch.from_numpy(txt),
                   guidance=torch.from_numpy(guidance)).sample.numpy()

    fn = jax.jit(lambda p, g, *a: module.apply(p, *a, ids, txt, g, capture=AttnCapture()))
    pred, aux = fn({"params": params}, guidance, packed, t, ctx, pooled)
    assert pred.shape == packed.shape
    assert np.abs(np.asarray(pred) - want).max() < 1e-4
    _, aux_nhwc = _apply(module, params, (x, t, ctx, pooled, guidance), capture=AttnCapture())
    assert rel_err(aux["attn"], aux_nhwc["attn"]) < 1e-6
    # Positions as jit arguments are fine without maps; with maps the grid must be known while tracing.
    traced = jax.jit(lambda p, *a: module.apply(p, *a))({"params": params}, packed, t, ctx, pooled, ids, txt, guidance)
    assert rel_err(traced[0], pred) < 1e-6
    with pytest.raises(ValueError, match="img_ids known while tracing"):
        jax.jit(lambda p, *a: module.apply(p, *a, capture=AttnCapture()))(
            {"params": params}, packed, t, ctx, pooled, ids, txt, guidance)


def test_capture_blocks_subset_and_none(models):
    ref, _, module, params = models("dev")
    inputs = make_inputs("dev")
    _, blocks = torch_forward(ref, *inputs, record=True)
    _, aux = _apply(module, params, inputs, capture=AttnCapture(blocks=(1, -1)))  # last double, last single
    assert np.abs(np.asarray(aux["attn"]) - _maps([blocks[1], blocks[-1]], aux["attn"].shape)).max() < 1e-5
    with pytest.raises(ValueError, match="block 4"):
        module.apply({"params": params}, *inputs[:4], guidance=inputs[4], capture=AttnCapture(blocks=(4,)))
    pred, aux = _apply(module, params, inputs)
    assert "attn" not in aux
    pred_c, _ = _apply(module, params, inputs, capture=AttnCapture())
    assert rel_err(pred, pred_c) < 1e-6


def test_jit_compiles_once(models):
    _, _, module, params = models("dev")
    fn = jax.jit(partial(module.apply, capture=AttnCapture(), taca=TACA()))
    for seed in range(2):
        x, _, ctx, pooled, guidance = make_inputs("dev", seed=seed)
        t = np.array([990.0, 10.0 * seed], np.float32)
        fn({"params": params}, x, t, ctx, pooled, guidance=guidance)
    assert fn._cache_size() == 1


def test_lora_on_one_projection(models):
    _, _, module, params = models("dev")
    inputs = make_inputs("dev")
    # Anchored: unanchored, the pattern also matches `single_transformer_blocks.0.attn.to_q`.
    lp = lora.init(jax.random.key(0), params, targets=r"^transformer_blocks\.0\.attn\.to_q$", rank=2, alpha=4)
    assert [join_path(p) for p in lora.adapters(lp)] == ["transformer_blocks.0.attn.to_q"]
    plain, _ = _apply(module, params, inputs)
    x, t, ctx, pooled, guidance = inputs
    fn = jax.jit(lambda variables: module.apply(variables, x, t, ctx, pooled, guidance=guidance)[0])
    assert rel_err(fn({"params": params, "lora": lp}), plain) < 1e-6  # B = 0

    adapter = lp["transformer_blocks_0"]["attn"]["to_q"]
    adapter["B"] = jax.random.normal(jax.random.key(1), adapter["B"].shape) * 0.5
    with_lora = fn({"params": params, "lora": lp})
    assert rel_err(with_lora, plain) > 1e-3
    merged, _ = _apply(module, lora.merge(params, lp), inputs)
    assert rel_err(with_lora, merged) < 1e-5


def test_remat_same_outputs_and_differentiates(models):
    """Per-block remat keeps the parameter tree and the outputs, and traces under `jax.grad` with the
    Python arguments (`capture`, the text length) static. (Gradient equality for every family and
    policy is `test_remat.py`'s; a compiled FLUX backward would double this file's time.)"""
    _, _, module, params = models("schnell")
    inputs = make_inputs("schnell")
    kw = dict(capture=AttnCapture(blocks=(0, -1)), taca=TACA(GAMMA, 970.0))
    rematted = module.clone(remat="full")
    pred, aux = _apply(module, params, inputs, **kw)
    pred_r, aux_r = _apply(rematted, params, inputs, **kw)
    assert rel_err(pred_r, pred) < 1e-6 and rel_err(aux_r["attn"], aux["attn"]) < 1e-6

    def loss(p):
        pred, aux = rematted.apply({"params": p}, *inputs[:4], **kw)
        return jnp.sum(pred**2) + jnp.sum(aux["attn"])

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    assert sum(eqn.primitive.name == "remat2" for eqn in jaxpr.eqns) >= 3  # every block (1 double, 2 single)


@pytest.mark.parametrize("taca", [None, TACA(GAMMA, 970.0)])
def test_fused_matches_explicit(models, taca):
    _, _, module, params = models("dev")
    inputs = make_inputs("dev")
    kw = dict(capture=AttnCapture(), **({} if taca is None else {"taca": taca}))
    fused, aux_f = _apply(module.clone(implementation="fused"), params, inputs, **kw)
    # On CPU the loaded module is the explicit path, already compiled by the parity tests.
    reference = module if attn_lib.resolve(module.implementation) == "explicit" else module.clone(
        implementation="explicit")
    explicit, aux_e = _apply(reference, params, inputs, **kw)
    assert rel_err(fused, explicit) < 1e-5
    assert rel_err(aux_f["attn"], aux_e["attn"]) < 1e-5


def test_bf16_compute_over_fp32_params(models):
    ref, folder, _, _ = models("dev")
    inputs = make_inputs("dev")
    want, blocks = torch_forward(ref, *inputs, record=True)
    module, params = load_component(folder, "transformer", dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    pred, aux = _apply(module, params, inputs, capture=AttnCapture())
    assert pred.dtype == jnp.bfloat16
    assert rel_err(pred, want) < 2e-2
    assert rel_err(aux["attn"], _maps(blocks, aux["attn"].shape)) < 2e-2


# --- conversion ----------------------------------------------------------------------------------------


def test_state_dict_round_trip(models):
    """Every diffusers tensor maps to one parameter, and back unchanged."""
    ref, _, _, params = models("dev")
    want = {k: v.numpy() for k, v in ref.state_dict().items()}
    back = names.flax_to_torch(params)
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def _torch_shapes(abstract) -> dict[str, tuple[int, ...]]:
    """State-dict key -> PyTorch shape of each abstract Flax parameter (the inverse name rule)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = tuple(k.key for k in path)
        shape = tuple(leaf.shape)[::-1] if keys[-1] == "kernel" else tuple(leaf.shape)
        out[join_path(keys[:-1]) + "." + ("bias" if keys[-1] == "bias" else "weight")] = shape
    return out


@pytest.mark.parametrize("config", [known.FLUX_DEV, known.FLUX_SCHNELL], ids=["dev", "schnell"])
def test_released_configs_match_diffusers_names_and_shapes(config):
    """The full-size FLUX.1 configs: every parameter name and shape as diffusers' (abstract: no weights)."""
    from diffusers import FluxTransformer2DModel as TorchFlux

    module = flux_conversion.build(config)
    assert (module.patch_size, module.in_channels, module.out_channels) == (2, 16, 16)
    with torch.device("meta"):
        ref = TorchFlux(**{k: v for k, v in config.items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert _torch_shapes(flux_conversion.abstract_params(module, config)) == want


def test_sharded_checkpoint_loads(models, tmp_path):
    ref, _, _, params = models("schnell")
    folder = save(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 2
    _, sharded = load_component(folder, "transformer")
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


_MESH_LOAD = """
import json, sys
import jax, numpy as np
from conversion import load_component
from ctcal_jax.sharding import DEFAULT_RULES, make_mesh
assert jax.device_count() == 8
_, ref = load_component(sys.argv[1], "transformer")
_, params = load_component(sys.argv[1], "transformer", mesh=make_mesh(2, 4), rules=DEFAULT_RULES)
split = 0
for x, r in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
    split += not x.sharding.is_fully_replicated
print(json.dumps({"leaves": len(jax.tree.leaves(params)), "split": split}))
"""


def test_loads_onto_an_8_device_mesh(models):
    """`load_component(..., mesh=, rules=)` on a (data 2, fsdp 4) mesh of fake CPU devices: every
    parameter the unsharded load's, the kernels split over `fsdp` (a subprocess: XLA reads the
    device count once)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, folder, _, params = models("dev")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _MESH_LOAD, str(folder)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaves"] == len(jax.tree.leaves(params)) and out["split"] > out["leaves"] // 3, out


@pytest.mark.parametrize("update,key", [
    ({"patch_size": 2}, "patch_size"),
    ({"in_channels": 18}, "in_channels"),
    ({"axes_dims_rope": (4, 4, 4)}, "axes_dims_rope"),
    ({"guidance_embeds": "yes"}, "guidance_embeds"),
    ({"num_layers": 0}, "num_layers"),
    ({"use_rope": True}, "use_rope"),
])
def test_unsupported_config_raises(update, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        flux_conversion.build({**CONFIGS["dev"], **update})


def test_guidance_required_by_dev_refused_by_schnell(models):
    for name, guidance, match in (("dev", None, "pass guidance"), ("schnell", np.ones(2, np.float32), "no guidance")):
        _, _, module, params = models(name)
        x, t, ctx, pooled, _ = make_inputs(name)
        with pytest.raises(ValueError, match=match):
            module.apply({"params": params}, x, t, ctx, pooled, guidance=guidance)
    assert isinstance(module, FluxTransformer2DModel)
