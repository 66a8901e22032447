"""AutoencoderKL against diffusers with the same random weights: SD-like (4 latent channels, quant
convs) and SD3/FLUX-like (16 channels, no quant convs, shift/scale); legacy attention names; the
pipelines' latent scaling by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax.traverse_util import flatten_dict, unflatten_dict

from conversion import files, load_component, names
from ctcal_jax.models.vae import AutoencoderKL as FlaxAutoencoderKL
from ctcal_jax.models.vae import scale_latents, unscale_latents
from tests.tiny import nchw, nhwc, randomize, rel_err, save

CONFIGS = {
    "sd": dict(block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4),
    "sd3": dict(block_out_channels=(8, 16, 16), latent_channels=16, layers_per_block=2, norm_num_groups=4,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
}


def _torch_vae(seed: int = 0, **config) -> AutoencoderKL:
    n = len(config["block_out_channels"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        **config).eval()
    randomize(vae, seed)
    return vae


def _reference(vae, images, seed=0):
    with torch.no_grad():
        post = vae.encode(torch.tensor(nchw(images))).latent_dist
        latents = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(seed))
        decoded = vae.decode(latents).sample
    return nhwc(post.mean.numpy()), nhwc(post.logvar.numpy()), nhwc(latents.numpy()), nhwc(decoded.numpy())


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    vae = _torch_vae(**CONFIGS[request.param])
    folder = save(vae, tmp_path_factory.mktemp(request.param))
    images = np.random.RandomState(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)  # H != W
    return request.param, vae, folder, images, _reference(vae, images)


@pytest.mark.parametrize("implementation", ["fused", "explicit"])
def test_parity_fp32(case, implementation):
    kind, _, folder, images, (mean, logvar, latents, decoded) = case
    module, params = load_component(folder, "vae")
    module = module.clone(implementation=implementation)
    ours_mean, ours_logvar = module.apply({"params": params}, jnp.asarray(images), method="encode")
    factor = 2 ** (len(CONFIGS[kind]["block_out_channels"]) - 1)
    assert ours_mean.shape == (2, 16 // factor, 24 // factor, CONFIGS[kind]["latent_channels"])
    assert rel_err(ours_mean, mean) <= 1e-4
    assert rel_err(ours_logvar, logvar) <= 1e-4
    ours = module.apply({"params": params}, jnp.asarray(latents), method="decode")
    assert rel_err(ours, decoded) <= 1e-4
    assert ("quant_conv" in params) == (kind == "sd")


def test_parity_bf16(tmp_path):
    """bf16 compute over fp32 weights against the fp32 diffusers module (single-level VAE: every
    layer kind bar the resamplers; each extra level adds rounding steps that push random
    networks past 2e-2 in torch's own bf16 as well)."""
    vae = _torch_vae(seed=1, block_out_channels=(16,), latent_channels=4, layers_per_block=1, norm_num_groups=4)
    folder = save(vae, tmp_path)
    images = np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mean, logvar, latents, decoded = _reference(vae, images)
    module, params = load_component(folder, "vae", compute_dtype=jnp.bfloat16)
    ours_mean, ours_logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, images)
    ours = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, latents)
    assert ours.dtype == jnp.bfloat16
    assert rel_err(ours_mean, mean) <= 2e-2
    assert rel_err(ours_logvar, logvar) <= 2e-2
    assert rel_err(ours, decoded) <= 2e-2


def test_parameter_names_round_trip(case):
    _, vae, folder, _, _ = case
    _, params = load_component(folder, "vae")
    assert set(names.flax_to_torch(params)) == set(vae.state_dict())


def test_legacy_attention_names(case, tmp_path):
    """Checkpoints from before diffusers renamed the mid-block attention (query/key/value/proj_attn)."""
    _, _, folder, images, (mean, *_) = case
    legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    state, _ = files.read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in state.items():
        for old, new in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = np.asarray(value)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    files.write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", renamed)
    module, params = load_component(tmp_path, "vae")
    assert rel_err(module.apply({"params": params}, jnp.asarray(images), method="encode")[0], mean) <= 1e-4


def test_logvar_clamped(case):
    """diffusers' DiagonalGaussianDistribution clamps logvar to [-30, 20]."""
    kind, _, folder, images, _ = case
    module, params = load_component(folder, "vae")
    last = ("quant_conv", "bias") if kind == "sd" else ("encoder", "conv_out", "bias")
    z = CONFIGS[kind]["latent_channels"]
    for shift, bound in ((1e4, 20.0), (-1e4, -30.0)):
        flat = flatten_dict(params)
        flat[last] = flat[last].at[z:].add(shift)  # the logvar half of the moments
        _, logvar = module.apply({"params": unflatten_dict(flat)}, jnp.asarray(images), method="encode")
        np.testing.assert_array_equal(logvar, bound)


def test_latent_scaling_by_hand():
    z = jnp.asarray([[-1.0, 0.0, 2.0]])
    sd = FlaxAutoencoderKL(scaling_factor=0.18215)
    sd3 = FlaxAutoencoderKL(scaling_factor=1.5305, shift_factor=0.0609)
    np.testing.assert_allclose(scale_latents(z, sd), [[-0.18215, 0.0, 0.3643]], rtol=1e-6)
    np.testing.assert_allclose(scale_latents(z, sd3), [[-1.62370605, -0.09320745, 2.96779255]], rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(jnp.asarray([[0.3643]]), sd), [[2.0]], rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(jnp.asarray([[2.96779255]]), sd3), [[2.0]], rtol=1e-6)



@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_full_size(kind, tmp_path):
    """The SD 1.x/2.x and SD3 VAE configs on 64×64 images."""
    config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    if kind == "sd3":
        config.update(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                      scaling_factor=1.5305)
    vae = _torch_vae(**config)
    folder = save(vae, tmp_path)
    images = np.random.RandomState(0).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    mean, logvar, latents, decoded = _reference(vae, images)
    module, params = load_component(folder, "vae")
    ours_mean, ours_logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, images)
    assert rel_err(ours_mean, mean) <= 1e-4
    assert rel_err(ours_logvar, logvar) <= 1e-4
    ours = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, latents)
    assert rel_err(ours, decoded) <= 1e-4
