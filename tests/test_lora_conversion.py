"""LoRA import/export against diffusers + peft as the client, on tiny pipelines built here.

Every check is at the output level: our Flax model (`load_component` of the saved pipeline) with
the LoRA applied unmerged (the `"lora"` collection) and merged (`lora.merge`) against the PyTorch
module holding the same LoRA (loaded by diffusers' `load_lora_weights`, added by peft, or reloaded
from a merged export), for SD 1.x's UNet and CLIP text encoder and SD3's MM-DiT and two projected
CLIP text encoders (CLIP-L, CLIP-G).
"""

import copy
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conversion import export_component, export_lora, files, import_lora, load_component, names  # noqa: E402
from ctcal_jax import lora  # noqa: E402
from ctcal_jax.paths import join_path  # noqa: E402
from tests.tiny import nchw, nhwc, randomize, real_clip_tokenizer, rel_err  # noqa: E402

TE_TARGETS = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
MMDIT_TARGETS = r"attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
PROMPTS = ["a giraffe next to a traffic light", "two red apples and a banana on a wooden table"]


def tiny_clip(cls, seed: int):
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=49408, projection_dim=32)
    model = cls(config).eval()
    randomize(model, seed)
    return model


def text_encoder_io(folder, component: str, tokenizer) -> tuple:
    """Our params of a CLIP `component` and the two sides run on `PROMPTS`: `ours(params)` and
    `theirs(torch module)`, each -> {"last_hidden_state", "pooled"}."""
    model, params = load_component(folder, component)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    apply = jax.jit(model.apply)

    def ours(p, lp=None):
        out = apply(variables(p, lp), jnp.asarray(ids))
        return {"last_hidden_state": np.asarray(out["last_hidden_state"]), "pooled": np.asarray(out["pooled"])}

    def theirs(te):
        with torch.no_grad():
            out = te(torch.from_numpy(ids).long())
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return {"last_hidden_state": out.last_hidden_state.numpy(), "pooled": pooled.numpy()}

    return params, ours, theirs


def variables(params, lp=None) -> dict:
    return {"params": params} if lp is None else {"params": params, "lora": lp}


def assert_matches(case, component: str, module, lp: dict) -> None:
    """Our `component` with the LoRA `lp`, unmerged and merged, against the PyTorch `module`: every
    output within 1e-4 of it, and visibly moved (> 1e-3) from our output without the LoRA."""
    params = case.params[component]
    base, theirs = case.ours[component](params), case.theirs[component](module)
    for how, ours in (("unmerged", case.ours[component](params, lp)),
                      ("merged", case.ours[component](lora.merge(params, lp)))):
        for key in ours:
            assert rel_err(ours[key], base[key]) > 1e-3, f"{component} {key}: the LoRA changed nothing"
            assert rel_err(ours[key], theirs[key]) <= 1e-4, f"{component} {key} ({how})"


def by_module(lp: dict) -> dict:
    """`{dotted module path: adapter}` of a LoRA tree."""
    return {join_path(path): ab for path, ab in lora.adapters(lp).items()}


def random_lora(lp: dict, seed: int, scale: float = 0.1) -> dict:
    """The adapters of `lp` with random non-zero A and B."""
    rng = np.random.default_rng(seed)
    return lora.from_paths({
        path: {"A": jnp.asarray(rng.normal(size=ab["A"].shape) * scale, jnp.float32),
               "B": jnp.asarray(rng.normal(size=ab["B"].shape) * scale, jnp.float32), "alpha": ab["alpha"]}
        for path, ab in lora.adapters(lp).items()})


def mixed_lora(params, targets: str, alpha: float, seed: int) -> dict:
    """Rank 4 and `alpha` on `targets`, rank 2 / alpha 3 on the k projections: alpha ≠ rank, per module."""
    base = lora.adapters(lora.init(jax.random.key(seed), params, targets=targets, rank=4, alpha=alpha))
    odd = lora.adapters(lora.init(jax.random.key(seed), params, targets=r"(to_k|k_proj)$", rank=2, alpha=3.0))
    return random_lora(lora.from_paths({**base, **{p: ab for p, ab in odd.items() if p in base}}), seed)


def check_export_loads(case, lps: dict, out_dir) -> None:
    """`export_lora` of `lps`, loaded by `pipe.load_lora_weights`, reproduces `lora.merge` on every
    component; re-importing gives the same adapters back (CLIP's `text_model.` reconciled)."""
    export_lora(out_dir, lps)
    pipe = case.fresh()
    pipe.load_lora_weights(out_dir)
    for component, lp in lps.items():
        assert_matches(case, component, getattr(pipe, component), lp)
    jax.tree.map(np.testing.assert_array_equal, import_lora(out_dir, params=case.params), lps)


def peft_lora(pipe, configs: dict, out_dir) -> None:
    """Add a peft adapter `configs[component]` to each component of `pipe`, fill it with random
    non-zero weights, and save the lot with the pipeline's `save_lora_weights` (alphas in metadata)."""
    from peft.utils import get_peft_model_state_dict

    gen = torch.Generator().manual_seed(0)
    kwargs = {}
    for component, config in configs.items():
        model = getattr(pipe, component)
        model.add_adapter(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        kwargs[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{component}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(out_dir, **kwargs)


def check_merged_export(case, component: str, cls, lp: dict, out_dir) -> None:
    """`export_component` of the merged params reloads with `cls.from_pretrained`, every weight of the
    source folder present, and reproduces them."""
    export_component(out_dir, lora.merge(case.params[component], lp), case.folder, component)
    model, info = cls.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_matches(case, component, model.eval(), lp)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny StableDiffusionPipeline saved with save_pretrained; our UNet and CLIP loaded from it."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=32,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32).eval()
    randomize(unet, 1)
    randomize(vae, 2)
    parts = dict(unet=unet, vae=vae, text_encoder=tiny_clip(transformers.CLIPTextModel, 3),
                 tokenizer=real_clip_tokenizer(), scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    StableDiffusionPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    model, params = load_component(folder, "unet")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    ctx = rng.normal(size=(2, 5, 32)).astype(np.float32)
    apply = jax.jit(model.apply)

    def ours(p, lp=None):
        return {"sample": np.asarray(apply(variables(p, lp), x, t, ctx)[0])}

    def torch_unet(u):
        with torch.no_grad():
            out = u(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx)).sample
        return {"sample": nhwc(out.numpy())}

    def fresh():
        return StableDiffusionPipeline(**{k: copy.deepcopy(v) for k, v in parts.items()})

    te_params, ours_te, torch_te = text_encoder_io(folder, "text_encoder", parts["tokenizer"])
    return types.SimpleNamespace(folder=folder, params={"unet": params, "text_encoder": te_params},
                                 ours={"unet": ours, "text_encoder": ours_te},
                                 theirs={"unet": torch_unet, "text_encoder": torch_te}, fresh=fresh)


@pytest.mark.parametrize("alpha", [2.0, 8.0])
def test_export_loads_in_diffusers(sd, tmp_path, alpha):
    check_export_loads(sd, {"unet": mixed_lora(sd.params["unet"], lora.DEFAULT_TARGETS, alpha, seed=1),
                            "text_encoder": mixed_lora(sd.params["text_encoder"], TE_TARGETS, alpha / 2, seed=2)},
                       tmp_path)


def test_import_lora_made_by_diffusers_and_peft(sd, tmp_path):
    from peft import LoraConfig

    pipe = sd.fresh()
    peft_lora(pipe, {
        "unet": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                           rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_q": 3}),
        "text_encoder": LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj", "out_proj"]),
    }, tmp_path)
    loras = import_lora(tmp_path, params=sd.params)
    assert set(loras) == {"unet", "text_encoder"}
    assert {lora.alpha(ab) for ab in by_module(loras["unet"]).values()} == {3.0, 8.0}
    for component, lp in loras.items():
        assert_matches(sd, component, getattr(pipe, component), lp)


def kohya_file(tmp_path, sd, alpha=None) -> tuple:
    """A kohya-format LoRA of rank 4 on UNet attention, feed-forward and CLIP layers; `alpha`, or
    alphas 1, 2, 3, ... varying per module."""
    from safetensors.torch import save_file

    unet = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
            "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
            "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"]
    te = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.out_proj",
          "text_model.encoder.layers.1.mlp.fc1"]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for prefix, modules, component in (("lora_unet_", unet, "unet"), ("lora_te_", te, "text_encoder")):
        shapes = {m: shape for m, (_, shape) in lora.kernels(sd.params[component]).items()}
        for i, module in enumerate(modules):
            d_in, d_out = shapes[module]
            name = prefix + module.replace(".", "_")
            state[f"{name}.lora_down.weight"] = torch.randn(4, d_in, generator=gen) * 0.1
            state[f"{name}.lora_up.weight"] = torch.randn(d_out, 4, generator=gen) * 0.1
            # kohya files in the wild store alphas with shape () and with shape (1,)
            state[f"{name}.alpha"] = torch.tensor(alpha or float(i + 1)).reshape((1,) if i % 2 else ())
    file = tmp_path / "kohya.safetensors"
    save_file(state, file)
    return file, state


def test_kohya_matches_diffusers_conversion(sd, tmp_path):
    # One alpha for all modules: diffusers 0.42 loses per-module kohya alphas of attention layers
    # (its alpha_pattern keeps kohya's `processor.to_q_lora` names), so it is no oracle for those;
    # test_kohya_alpha_and_merge_formula covers them.
    file, _ = kohya_file(tmp_path, sd, alpha=2.0)
    pipe = sd.fresh()
    pipe.load_lora_weights(tmp_path, weight_name=file.name)
    loras = import_lora(file, params=sd.params)
    # Without params the kohya names are split by known module names: the same paths.
    assert jax.tree.map(np.shape, import_lora(file)) == jax.tree.map(np.shape, loras)
    for component, lp in loras.items():
        assert_matches(sd, component, getattr(pipe, component), lp)


def test_kohya_alpha_and_merge_formula(sd, tmp_path):
    """Each kohya module keeps its own alpha (sd-scripts, ComfyUI): W + (alpha / r) · up @ down."""
    file, state = kohya_file(tmp_path, sd)
    loras = import_lora(file, params=sd.params)
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        params = sd.params[component]
        merged = names.flax_to_torch(lora.merge(params, loras[component]))
        base = names.flax_to_torch(params)
        for module in by_module(loras[component]):
            name = prefix + module.replace(".", "_")
            want = base[f"{module}.weight"] + float(state[f"{name}.alpha"]) / 4 * (
                state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"]).numpy()
            assert rel_err(merged[f"{module}.weight"], want) <= 1e-6, module


def test_merged_export_reloads_in_diffusers(sd, tmp_path):
    from diffusers import UNet2DConditionModel

    check_merged_export(sd, "unet", UNet2DConditionModel,
                        mixed_lora(sd.params["unet"], lora.DEFAULT_TARGETS, 2.0, seed=3), tmp_path / "unet")
    check_merged_export(sd, "text_encoder", transformers.CLIPTextModel,
                        mixed_lora(sd.params["text_encoder"], TE_TARGETS, 2.0, seed=4), tmp_path / "te")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny StableDiffusion3Pipeline (no T5) saved with save_pretrained; our MM-DiT and both CLIP
    text encoders loaded from it."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    randomize(transformer, 5)
    parts = dict(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32).eval(),
        text_encoder=tiny_clip(transformers.CLIPTextModelWithProjection, 6), tokenizer=real_clip_tokenizer(),
        text_encoder_2=tiny_clip(transformers.CLIPTextModelWithProjection, 7),
        tokenizer_2=real_clip_tokenizer(pad_token="!"), text_encoder_3=None, tokenizer_3=None,
    )
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    StableDiffusion3Pipeline(**parts).save_pretrained(folder, safe_serialization=True)
    model, params = load_component(folder, "transformer")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    t = np.array([20.0, 900.0], np.float32)
    ctx = rng.normal(size=(2, 5, 32)).astype(np.float32)
    pooled = rng.normal(size=(2, 64)).astype(np.float32)
    apply = jax.jit(model.apply)

    def ours(p, lp=None):
        return {"sample": np.asarray(apply(variables(p, lp), x, t, ctx, pooled)[0])}

    def torch_transformer(m):
        with torch.no_grad():
            out = m(hidden_states=torch.from_numpy(nchw(x)), encoder_hidden_states=torch.from_numpy(ctx),
                    pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t)).sample
        return {"sample": nhwc(out.numpy())}

    def fresh():
        return StableDiffusion3Pipeline(**{k: copy.deepcopy(v) for k, v in parts.items()})

    case = types.SimpleNamespace(folder=folder, params={"transformer": params}, ours={"transformer": ours},
                                 theirs={"transformer": torch_transformer}, fresh=fresh)
    for component, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        te_params, case.ours[component], case.theirs[component] = text_encoder_io(folder, component, parts[tokenizer])
        case.params[component] = te_params
    return case


def test_sd3_export_loads_in_diffusers(sd3, tmp_path):
    lps = {
        "transformer": mixed_lora(sd3.params["transformer"], MMDIT_TARGETS, 8.0, seed=5),
        "text_encoder": mixed_lora(sd3.params["text_encoder"], TE_TARGETS, 2.0, seed=6),
        "text_encoder_2": mixed_lora(sd3.params["text_encoder_2"], TE_TARGETS, 6.0, seed=7),
    }
    # Joint attention of both blocks (the last one without `to_add_out`) and SD3.5's image-only attn2.
    assert {"transformer_blocks.1.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.0.attn2.to_q"} <= set(by_module(lps["transformer"]))
    check_export_loads(sd3, lps, tmp_path)


def test_sd3_import_lora_made_by_diffusers_and_peft(sd3, tmp_path):
    from peft import LoraConfig

    pipe = sd3.fresh()
    te_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]
    peft_lora(pipe, {
        "transformer": LoraConfig(r=4, lora_alpha=8, target_modules=[
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
            rank_pattern={"add_k_proj": 2}, alpha_pattern={"attn2.to_v": 3}),
        "text_encoder": LoraConfig(r=4, lora_alpha=8, target_modules=te_modules),
        "text_encoder_2": LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=te_modules),
    }, tmp_path)
    loras = import_lora(tmp_path, params=sd3.params)
    assert set(loras) == {"transformer", "text_encoder", "text_encoder_2"}
    adapters = by_module(loras["transformer"])
    assert {m: ab["A"].shape[1] for m, ab in adapters.items() if ab["A"].shape[1] != 4} == {
        f"transformer_blocks.{i}.attn.add_k_proj": 2 for i in (0, 1)}
    assert {lora.alpha(ab) for ab in adapters.values()} == {3.0, 8.0}
    for component, lp in loras.items():
        assert_matches(sd3, component, getattr(pipe, component), lp)


def test_sd3_merged_export_reloads_in_diffusers(sd3, tmp_path):
    from diffusers import SD3Transformer2DModel

    check_merged_export(sd3, "transformer", SD3Transformer2DModel,
                        mixed_lora(sd3.params["transformer"], MMDIT_TARGETS, 2.0, seed=8), tmp_path / "transformer")
    check_merged_export(sd3, "text_encoder_2", transformers.CLIPTextModelWithProjection,
                        mixed_lora(sd3.params["text_encoder_2"], TE_TARGETS, 2.0, seed=9), tmp_path / "te2")


def test_unmatched_and_unsupported_keys_are_named(sd, tmp_path):
    from safetensors.torch import save_file

    ab = {"lora_A.weight": torch.ones(2, 32), "lora_B.weight": torch.ones(32, 2)}
    bogus = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z"
    save_file({f"{bogus}.{k}": v for k, v in ab.items()}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"attn1\.to_z\.lora_A\.weight.*match no Dense layer"):
        import_lora(tmp_path / "a.safetensors", params={"unet": sd.params["unet"]})
    with pytest.raises(ValueError, match=r"attn1\.to_z: no Dense kernel"):
        lora.merge(sd.params["unet"], import_lora(tmp_path / "a.safetensors")["unet"])

    save_file({"vae.encoder.conv_in.lora_A.weight": torch.ones(2, 3),
               "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": torch.ones(3)},
              tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"lora_magnitude_vector.*vae\.encoder\.conv_in\.lora_A\.weight"):
        import_lora(tmp_path / "b.safetensors")

    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 32, 3, 3),
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(32, 2, 1, 1)},
              tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"resnets_0_conv1\.lora_down\.weight.*convolution"):
        import_lora(tmp_path / "c.safetensors")


def test_scalars_written_0d_and_kohya_alphas_of_either_shape_read(sd, tmp_path):
    from safetensors.numpy import load_file

    files.write_safetensors(tmp_path / "s.safetensors", {"alpha": np.float32(2.0), "v": np.ones(1, np.float32)})
    assert {k: v.shape for k, v in load_file(tmp_path / "s.safetensors").items()} == {"alpha": (), "v": (1,)}
    assert files.read_safetensors(tmp_path / "s.safetensors")[0]["alpha"].shape == ()
    # The kohya file (alphas of shape () and (1,), written by safetensors.torch) rewritten by our writer:
    # the shapes survive, and both files import to the same adapters and alphas.
    file, state = kohya_file(tmp_path, sd)
    files.write_safetensors(tmp_path / "ours.safetensors", {k: v.numpy() for k, v in state.items()})
    shapes = {k: v.shape for k, v in load_file(tmp_path / "ours.safetensors").items() if k.endswith(".alpha")}
    assert set(shapes.values()) == {(), (1,)} and shapes == {k: tuple(state[k].shape) for k in shapes}
    ours = import_lora(tmp_path / "ours.safetensors", params=sd.params)
    jax.tree.map(np.testing.assert_array_equal, ours, import_lora(file, params=sd.params))
    assert {lora.alpha(ab) for ab in by_module(ours["unet"]).values()} == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_lora_for_components_params_lack_and_non_lora_files(sd, tmp_path):
    from safetensors.torch import save_file

    ab = {"lora_A.weight": torch.ones(2, 32), "lora_B.weight": torch.ones(32, 2)}
    save_file({f"transformer.transformer_blocks.0.attn.to_q.{k}": v for k, v in ab.items()}, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=r"components \['transformer'\] but params= holds \['unet'\]"):
        import_lora(tmp_path / "t.safetensors", params={"unet": sd.params["unet"]})
    # A full model's weights: the count of keys and the first few, on one short line.
    with pytest.raises(ValueError) as e:
        import_lora(sd.folder / "unet" / "diffusion_pytorch_model.safetensors")
    msg = str(e.value)
    assert re.search(r"\d+ of \d+ keys are not LoRA weights.*\.\.\. and \d+ more$", msg), msg
    assert "\n" not in msg and len(msg) < 600, msg


def test_export_is_atomic(sd, tmp_path, monkeypatch):
    lp = mixed_lora(sd.params["unet"], lora.DEFAULT_TARGETS, 2.0, seed=8)
    file = export_lora(tmp_path, {"unet": lp})
    good = file.read_bytes()
    real_fdopen = os.fdopen

    class DiskFull:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise OSError("disk full")
            return self.f.write(data)

    # Writes go through `ctcal_jax.atomic.atomic_write`, which opens its temporary file with os.fdopen.
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: DiskFull(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="disk full"):
        export_lora(tmp_path, {"unet": random_lora(lp, seed=9)})
    assert file.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]
