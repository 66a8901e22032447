"""SD3 / SD3.5 MM-DiT: parity with diffusers' `SD3Transformer2DModel`, captured maps, TACA, loading.

References:
- prediction, TACA off: diffusers' own forward (SDPA processor);
- maps, TACA off: the same diffusers model with `JointProbsProcessor`, which forms the joint softmax
  explicitly (image first, then text) and records its image-query × text-key block, head-mean;
- TACA on: `JointProbsProcessor` with per-sample γ, the SPEC §4 formula written out in PyTorch.
"""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conversion import load_component  # noqa: E402
from conversion import mmdit as mmdit_conversion  # noqa: E402
from ctcal_jax.attention import TACA, AttnCapture  # noqa: E402
from ctcal_jax.models.mmdit import sincos_pos_embed  # noqa: E402
from tests.tiny import JointProbsProcessor, model_cache, nchw, nhwc, rel_err, save  # noqa: E402

# Tiny configs in the style of each release; sizes differ between them on purpose (heads, widths,
# out ≠ in channels, odd crop offsets) so that a swapped axis or chunk order cannot pass by symmetry.
CONFIGS = {
    "sd3": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                pooled_projection_dim=20, out_channels=4, pos_embed_max_size=12),
    "sd35_medium": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                        num_attention_heads=3, joint_attention_dim=16, caption_projection_dim=24,
                        pooled_projection_dim=12, out_channels=6, pos_embed_max_size=13,
                        dual_attention_layers=(0, 2), qk_norm="rms_norm"),
    "sd35_large": dict(sample_size=32, patch_size=2, in_channels=8, num_layers=2, attention_head_dim=16,
                       num_attention_heads=3, joint_attention_dim=40, caption_projection_dim=48,
                       pooled_projection_dim=24, out_channels=8, pos_embed_max_size=21, qk_norm="rms_norm"),
    # No crop: the table is rebuilt for the input size (diffusers' non-SD3 PatchEmbed branch).
    "no_crop": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                    pooled_projection_dim=8, out_channels=4, pos_embed_max_size=None),
}
T_TXT = 7
HEIGHT, WIDTH = 16, 12  # latent size: 8 × 6 patches, 48 image tokens


def torch_forward(model, x, t, ctx, pooled, *, record: bool = False, gamma=None):
    """diffusers forward on NHWC numpy inputs -> (pred NHWC, per-block maps or None).

    With `record` or `gamma`, every joint attention (`transformer_blocks.i.attn`) runs
    `JointProbsProcessor`; SD3.5's image-only `attn2` keeps diffusers' processor.
    """
    store: list = []
    default = dict(model.attn_processors)
    if record or gamma is not None:
        g = None if gamma is None else torch.as_tensor(np.asarray(gamma, np.float32))
        model.set_attn_processor({name: JointProbsProcessor(store, g) if ".attn." in name else proc
                                  for name, proc in default.items()})
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(nchw(x)), torch.from_numpy(ctx), torch.from_numpy(pooled),
                        torch.from_numpy(np.asarray(t, np.float32))).sample
    finally:
        model.set_attn_processor(default)
    return nhwc(out.numpy()), ([m.numpy() for m in store] or None)


def make_inputs(cfg: dict, batch: int = 2, height: int = HEIGHT, width: int = WIDTH, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, cfg["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((batch, T_TXT, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, cfg["pooled_projection_dim"])).astype(np.float32)
    t = np.array([980.0, 500.0][:batch], np.float32)  # one sample above the TACA threshold, one below
    return x, t, ctx, pooled


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (torch model, folder, flax module, params), built on first use."""
    from diffusers import SD3Transformer2DModel

    return model_cache(SD3Transformer2DModel, CONFIGS, tmp_path_factory)


def _apply(module, params, inputs, **kw):
    return jax.jit(partial(module.apply, **kw))({"params": params}, *inputs)


PARITY = ["sd3", "sd35_medium", "sd35_large", "no_crop"]


@pytest.mark.parametrize("name", PARITY)
def test_parity_fp32_taca_off(models, name):
    ref, _, module, params = models(name)
    inputs = make_inputs(CONFIGS[name])
    want, _ = torch_forward(ref, *inputs)
    want_rec, blocks = torch_forward(ref, *inputs, record=True)
    assert rel_err(want_rec, want) < 1e-5  # the recording processor is the same attention
    assert len(blocks) == CONFIGS[name]["num_layers"]  # the context_pre_only block included

    pred, aux = _apply(module, params, inputs, capture=AttnCapture())
    assert pred.shape == inputs[0].shape[:3] + (CONFIGS[name]["out_channels"],)
    assert rel_err(pred, want) < 1e-4
    h, w = HEIGHT // 2, WIDTH // 2
    maps = np.mean(blocks, axis=0).reshape(2, h, w, T_TXT)
    assert aux["attn"].shape == (2, h, w, T_TXT)
    assert rel_err(aux["attn"], maps) < 1e-4


@pytest.mark.parametrize("name", ["sd3", "sd35_medium", "sd35_large"])
def test_parity_fp32_taca_on(models, name):
    """Per-sample γ: sample 0 (t=980 ≥ 970) gets γ=1.5, sample 1 (t=500) plain attention."""
    ref, _, module, params = models(name)
    inputs = make_inputs(CONFIGS[name])
    taca = TACA(gamma=1.5, t_threshold=970.0)
    gamma_ref = np.where(inputs[1] >= 970.0, 1.5, 1.0)
    want, blocks = torch_forward(ref, *inputs, gamma=gamma_ref)
    plain, _ = torch_forward(ref, *inputs)

    pred, aux = _apply(module, params, inputs, capture=AttnCapture(), taca=taca)
    assert rel_err(pred, want) < 1e-4
    assert rel_err(aux["attn"], np.mean(blocks, axis=0).reshape(aux["attn"].shape)) < 1e-4
    # TACA matters for the sample above the threshold and leaves the other one alone.
    assert rel_err(want[0], plain[0]) > 1e-3
    assert rel_err(pred[1], plain[1]) < 1e-5


def test_taca_gamma_one_is_plain(models):
    _, _, module, params = models("sd35_medium")
    inputs = make_inputs(CONFIGS["sd35_medium"])
    plain, aux = _apply(module, params, inputs, capture=AttnCapture())
    one, aux_one = _apply(module, params, inputs, capture=AttnCapture(), taca=TACA(gamma=1.0, t_threshold=0.0))
    assert rel_err(one, plain) < 1e-6
    assert rel_err(aux_one["attn"], aux["attn"]) < 1e-6


def test_capture_blocks_subset(models):
    ref, _, module, params = models("sd35_medium")
    inputs = make_inputs(CONFIGS["sd35_medium"])
    _, blocks = torch_forward(ref, *inputs, record=True)
    _, aux = _apply(module, params, inputs, capture=AttnCapture(blocks=(1, -1)))
    want = np.mean([blocks[1], blocks[-1]], axis=0).reshape(aux["attn"].shape)
    assert rel_err(aux["attn"], want) < 1e-4
    with pytest.raises(ValueError, match="block 4"):
        module.apply({"params": params}, *inputs, capture=AttnCapture(blocks=(4,)))


def test_capture_none_returns_no_maps(models):
    _, _, module, params = models("sd3")
    inputs = make_inputs(CONFIGS["sd3"])
    pred, aux = _apply(module, params, inputs)
    assert "attn" not in aux
    pred_c, aux_c = _apply(module, params, inputs, capture=AttnCapture())
    assert "attn" in aux_c
    assert rel_err(pred, pred_c) < 1e-6
    _, aux_t = _apply(module, params, inputs, taca=TACA())
    assert "attn" not in aux_t


@pytest.mark.parametrize("name", ["sd3", "sd35_medium"])
def test_bf16_compute_over_fp32_params(models, name):
    ref, folder, _, _ = models(name)
    inputs = make_inputs(CONFIGS[name])
    want, blocks = torch_forward(ref, *inputs, record=True)
    module, params = load_component(folder, "transformer", dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    pred, aux = _apply(module, params, inputs, capture=AttnCapture())
    assert pred.dtype == jnp.bfloat16
    assert rel_err(pred, want) < 2e-2
    assert rel_err(aux["attn"], np.mean(blocks, axis=0).reshape(aux["attn"].shape)) < 2e-2


@pytest.mark.parametrize("name", ["sd3", "sd35_medium"])
@pytest.mark.parametrize("taca", [None, TACA(gamma=1.5, t_threshold=970.0)])
def test_fused_matches_explicit(models, name, taca):
    _, _, module, params = models(name)
    inputs = make_inputs(CONFIGS[name])
    fused, aux_f = _apply(module.clone(implementation="fused"), params, inputs, capture=AttnCapture(), taca=taca)
    explicit, aux_e = _apply(module.clone(implementation="explicit"), params, inputs,
                             capture=AttnCapture(), taca=taca)
    assert rel_err(fused, explicit) < 1e-5
    assert rel_err(aux_f["attn"], aux_e["attn"]) < 1e-5


# --- no (image + text)² matrix on the fused path ---------------------------------------------------

_KERNEL = "fused_attention_kernel"


def _square_intermediates(jaxpr, sizes: set[int], opaque: bool) -> list[str]:
    """Shapes of every value the jaxpr computes (sub-jaxprs included) with two or more axes whose
    size is a sequence length in `sizes`. With `opaque`, calls named `_KERNEL` are not entered."""
    found = []
    for eqn in jaxpr.eqns:
        if opaque and _KERNEL in str(eqn.params.get("name", "")):
            continue
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if sum(d in sizes for d in shape) >= 2:
                found.append(f"{eqn.primitive.name}{list(shape)}")
        for sub in _sub_jaxprs(eqn.params.values()):
            found += _square_intermediates(sub, sizes, opaque)
    return found


def _sub_jaxprs(values):
    for v in values:
        if isinstance(v, jax.extend.core.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jax.extend.core.Jaxpr):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _sub_jaxprs(v)


def _opaque_dot_product_attention(monkeypatch):
    """Route `jax.nn.dot_product_attention` through a jit named `_KERNEL`, so that the kernel
    shows up as one call in the jaxpr. (The XLA fallback that runs on CPU does form the logits
    inside that call; cuDNN flash attention on GPU does not.)"""
    original = jax.nn.dot_product_attention

    def wrapped(q, k, v, *args, **kwargs):
        def fused_attention_kernel(q, k, v):
            return original(q, k, v, *args, **kwargs)

        return jax.jit(fused_attention_kernel)(q, k, v)

    monkeypatch.setattr(jax.nn, "dot_product_attention", wrapped)


@pytest.mark.parametrize("taca", [None, TACA(gamma=1.5, t_threshold=970.0)])
def test_fused_capture_forms_no_joint_attention_matrix(models, monkeypatch, taca):
    _, _, module, params = models("sd35_medium")  # dual attention: attn2 is checked too
    inputs = make_inputs(CONFIGS["sd35_medium"])
    n_img = (HEIGHT // 2) * (WIDTH // 2)
    sizes = {n_img, n_img + T_TXT}  # 48, 55: no other axis of this model has these sizes
    _opaque_dot_product_attention(monkeypatch)

    def trace(mod):
        fn = partial(mod.apply, capture=AttnCapture(), taca=taca)
        return jax.make_jaxpr(fn)({"params": params}, *inputs).jaxpr

    fused = trace(module.clone(implementation="fused"))
    assert _square_intermediates(fused, sizes, opaque=True) == []
    # The check sees matrices where they are: inside the kernel, and on the explicit path.
    assert _square_intermediates(fused, sizes, opaque=False)
    assert _square_intermediates(trace(module.clone(implementation="explicit")), sizes, opaque=True)


# --- position embedding, loading, config errors -----------------------------------------------------


@pytest.mark.parametrize("dim,grid,base,h,w", [(32, 12, 8, 8, 6), (24, 13, 8, 5, 9), (1536, 192, 64, 64, 48),
                                               (2432, 192, 64, 32, 32), (1536, 384, 64, 48, 64)])
def test_pos_embed_matches_diffusers(dim, grid, base, h, w):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    table = get_2d_sincos_pos_embed(dim, grid, base_size=base, output_type="pt").float().numpy().reshape(grid, grid, dim)
    top, left = (grid - h) // 2, (grid - w) // 2
    want = table[top:top + h, left:left + w].reshape(h * w, dim)
    assert np.abs(np.asarray(sincos_pos_embed(dim, h, w, grid, base)) - want).max() < 2e-5


def test_pos_embed_buffer_is_skipped_and_recomputed(models):
    ref, _, _, _ = models("sd3")
    buffer = ref.state_dict()["pos_embed.pos_embed"].numpy()[0]  # [12·12, 32], diffusers' own table
    assert mmdit_conversion.rename("pos_embed.pos_embed") is None
    ours = sincos_pos_embed(32, 12, 12, 12, 8)
    assert np.abs(np.asarray(ours) - buffer).max() < 2e-5


def test_state_dict_round_trip(models):
    """Every diffusers tensor but the position buffer maps to one parameter, and back unchanged."""
    from conversion import names

    ref, _, _, params = models("sd35_medium")
    want = {k: v.numpy() for k, v in ref.state_dict().items() if k != "pos_embed.pos_embed"}
    back = names.flax_to_torch(params)
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_sharded_checkpoint_loads(models, tmp_path):
    ref, _, _, params = models("sd35_medium")
    folder = save(ref, tmp_path / "sharded", max_shard_size="40KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 2
    _, sharded = load_component(folder, "transformer")
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


@pytest.mark.parametrize("update,key", [
    ({"qk_norm": "layer_norm"}, "qk_norm"),
    ({"caption_projection_dim": 40}, "caption_projection_dim"),
    ({"use_rope": True}, "use_rope"),
    ({"num_layers": 0}, "num_layers"),
    ({"dual_attention_layers": "all"}, "dual_attention_layers"),
])
def test_unsupported_config_raises(models, tmp_path, update, key):
    _, folder, _, _ = models("sd3")
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=key):
        mmdit_conversion.build({**config, **update})
    # Through the loader too, from a folder holding the edited config.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, **update}))
    (bad / "diffusion_pytorch_model.safetensors").symlink_to(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=key):
        load_component(bad, "transformer")


def test_bad_input_sizes_raise(models):
    _, _, module, params = models("sd3")
    x, t, ctx, pooled = make_inputs(CONFIGS["sd3"])
    with pytest.raises(ValueError, match="patch_size"):
        module.apply({"params": params}, x[:, :15], t, ctx, pooled)
    big = np.zeros((1, 26, 8, 4), np.float32)  # 13 patches > pos_embed_max_size=12
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        module.apply({"params": params}, big, t[:1], ctx[:1], pooled[:1])


# --- the released configs ----------------------------------------------------------------------------

REAL = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_released_config_parity(tmp_path, name):
    """The real SD3-medium / SD3.5-medium configs with random (PyTorch default) weights, 32×24
    latents, 10 text tokens, TACA off and on; about 16 GB of RAM at peak."""
    import gc

    from diffusers import SD3Transformer2DModel

    cfg = REAL[name]
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 24, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 10, 4096)).astype(np.float32)
    pooled = rng.standard_normal((2, 2048)).astype(np.float32)
    t = np.array([980.0, 500.0], np.float32)
    want, blocks = torch_forward(ref, x, t, ctx, pooled, record=True)
    want_taca, blocks_taca = torch_forward(ref, x, t, ctx, pooled, gamma=np.where(t >= 970, 1.5, 1.0))
    save(ref, tmp_path / name)
    del ref
    gc.collect()

    module, params = load_component(tmp_path / name, "transformer")
    inputs = (x, t, ctx, pooled)
    pred, aux = _apply(module, params, inputs, capture=AttnCapture())
    assert rel_err(pred, want) < 1e-4
    assert rel_err(aux["attn"], np.mean(blocks, axis=0).reshape(aux["attn"].shape)) < 1e-4
    pred, aux = _apply(module, params, inputs, capture=AttnCapture(), taca=TACA(1.5, 970.0))
    assert rel_err(pred, want_taca) < 1e-4
    assert rel_err(aux["attn"], np.mean(blocks_taca, axis=0).reshape(aux["attn"].shape)) < 1e-4
