"""FLUX.1 LoRA import and export against diffusers + peft, on the tiny FLUX.1-dev of `test_flux.py`.

Every check is at the output level: our `FluxTransformer2DModel` with the LoRA applied unmerged (the
`"lora"` collection) against diffusers' `FluxTransformer2DModel` holding the LoRA diffusers loads
from the same file (`FluxPipeline.load_lora_weights` on a transformer-only pipeline, or
`FluxPipeline.lora_state_dict` + `load_lora_into_transformer`), fed as FluxPipeline feeds it.

diffusers 0.42 is the oracle for the kohya and BFL layouts, with two adjustments for a tiny model that
touch how it splits and names, never its arithmetic: its kohya converter hard-codes FLUX.1's
single-block `linear1` split (3072, 3072, 3072, 12288), replaced here by the tiny model's widths; and
it names the layers outside the blocks (`img_in` -> `x_embedder`, `final_layer` -> `proj_out`, ...)
without the `transformer.` prefix, so `load_lora_weights` drops them: they are prefixed here.
"""

import copy
import inspect
import re
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from conversion import export_lora, flux as flux_conversion, import_lora, load_component  # noqa: E402
from ctcal_jax import lora  # noqa: E402
from tests.test_flux import CONFIGS, make_inputs, torch_forward  # noqa: E402
from tests.test_lora_conversion import by_module, random_lora  # noqa: E402
from tests.tiny import randomize, rel_err, save  # noqa: E402

CONFIG = CONFIGS["dev"]  # 2 double and 2 single blocks, guidance embedding
D = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]  # model width, 32
MAX_ABS = 1e-4


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny diffusers FLUX.1-dev transformer, our module loaded from its folder, and both forwards."""
    from diffusers import FluxTransformer2DModel as TorchFlux

    torch.manual_seed(0)
    ref = TorchFlux(**CONFIG).eval()
    randomize(ref, seed=1)
    module, params = load_component(save(ref, tmp_path_factory.mktemp("flux")), "transformer")
    inputs = make_inputs("dev")
    x, t, ctx, pooled, guidance = inputs
    apply = jax.jit(lambda variables: module.apply(variables, x, t, ctx, pooled, guidance=guidance)[0])

    def ours(lp=None):
        return np.asarray(apply({"params": params} if lp is None else {"params": params, "lora": lp}))

    def theirs(model):
        return torch_forward(model, *inputs)[0]

    return types.SimpleNamespace(ref=ref, params=params, ours=ours, theirs=theirs, base=ours())


def pipeline(flux):
    """A transformer-only FluxPipeline (no VAE, text encoders or tokenizers), on a copy of the tiny model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=copy.deepcopy(flux.ref))


def assert_matches(flux, model, lp, name: str) -> None:
    """Ours with `lp` unmerged against the torch `model`: within 1e-4 (max abs and relative), and
    visibly moved from the output without the LoRA."""
    ours, theirs = flux.ours(lp), flux.theirs(model)
    err = float(np.abs(ours - theirs).max())
    print(f"{name}: max abs {err:.2e}, relative {rel_err(ours, theirs):.2e}, output max {np.abs(theirs).max():.2f}")
    assert err <= MAX_ABS and rel_err(ours, theirs) <= MAX_ABS, name
    assert rel_err(ours, flux.base) > 1e-3, f"{name}: the LoRA changed nothing"


def load_converted(flux, file):
    """The torch transformer with the LoRA of `file` as diffusers converts it (module docstring)."""
    from diffusers import FluxPipeline

    state = FluxPipeline.lora_state_dict(str(file.parent), weight_name=file.name)
    state = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state.items()}
    model = copy.deepcopy(flux.ref)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=None, transformer=model)
    return model


@pytest.fixture
def tiny_kohya_split(monkeypatch):
    """diffusers' kohya FLUX converter with `linear1` split for this model's width (module docstring)."""
    from diffusers.loaders import lora_conversion_utils, lora_pipeline

    source = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    full = "dims=[3072, 3072, 3072, 12288]"
    assert source.count(full) == 1, "diffusers' kohya FLUX converter changed; revisit this oracle"
    namespace = dict(vars(lora_conversion_utils))
    exec(compile(source.replace(full, f"dims=[{D}, {D}, {D}, {4 * D}]"), lora_conversion_utils.__file__, "exec"),
         namespace)
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers",
                        namespace["_convert_kohya_flux_lora_to_diffusers"])


# --- export (diffusers / peft) ------------------------------------------------------------------------


def mixed_lora(params, seed: int) -> dict:
    """Random adapters on every Dense layer: rank 4 / alpha 8, rank 2 / alpha 3 on the k projections and
    the final `proj_out` (whose name ends the single blocks' `proj_out` too), alpha 5 on `proj_mlp`."""
    flat = lora.adapters(lora.init(jax.random.key(seed), params, targets=".", rank=4, alpha=8.0))
    flat.update(lora.adapters(lora.init(jax.random.key(seed), params, targets=r"(to_k|add_k_proj)$|^proj_out$",
                                        rank=2, alpha=3.0)))
    flat.update(lora.adapters(lora.init(jax.random.key(seed), params, targets=r"proj_mlp$", rank=4, alpha=5.0)))
    return random_lora(lora.from_paths(flat), seed)


def test_export_loads_in_diffusers(flux, tmp_path):
    lp = mixed_lora(flux.params, seed=1)
    modules = by_module(lp)
    assert {"single_transformer_blocks.1.attn.to_k", "single_transformer_blocks.0.proj_mlp", "proj_out",
            "single_transformer_blocks.0.proj_out", "transformer_blocks.1.attn.add_k_proj",
            "transformer_blocks.0.norm1_context.linear", "time_text_embed.guidance_embedder.linear_1"} <= set(modules)
    assert [(lora.rank(modules[m]), lora.alpha(modules[m])) for m in (
        "proj_out", "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp")] == [
        (2, 3.0), (4, 8.0), (4, 5.0)]
    # The final `proj_out` at rank 2 beside the single blocks' at rank 4: an unanchored peft rank_pattern
    # `proj_out` would give those rank 2 too, and the load would fail on their shapes.
    export_lora(tmp_path, {"transformer": lp})
    pipe = pipeline(flux)
    pipe.load_lora_weights(tmp_path)
    assert_matches(flux, pipe.transformer, lp, "export -> load_lora_weights")


def test_export_import_round_trip(flux, tmp_path):
    lp = mixed_lora(flux.params, seed=2)
    export_lora(tmp_path, {"transformer": lp})
    for params in (None, {"transformer": flux.params}):
        back = import_lora(tmp_path, params=params)
        assert list(back) == ["transformer"]
        jax.tree.map(np.testing.assert_array_equal, back["transformer"], lp)  # alphas: the tree structure


def test_import_lora_made_by_peft(flux, tmp_path):
    """The diffusers/peft form (`transformer.{module}.lora_A.weight`, the LoraConfig in the metadata),
    as `FluxPipeline.save_lora_weights` writes it and the official TACA FLUX weights come."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(flux.ref)
    model.add_adapter(LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                           "add_v_proj", "to_add_out", "proj_mlp", "proj_out", "norm.linear"],
        rank_pattern={"add_k_proj": 2}, alpha_pattern={"single_transformer_blocks.1.attn.to_v": 3}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    loras = import_lora(tmp_path, params={"transformer": flux.params})
    modules = by_module(loras["transformer"])
    assert "single_transformer_blocks.0.proj_out" in modules and "proj_out" in modules
    assert {lora.rank(ab) for m, ab in modules.items() if m.endswith("add_k_proj")} == {2}
    assert {m for m, ab in modules.items() if lora.alpha(ab) != 8.0} == {"single_transformer_blocks.1.attn.to_v"}
    assert_matches(flux, model, loras["transformer"], "peft file -> import")


# --- kohya and BFL names --------------------------------------------------------------------------------

# BFL layer -> (in, out) of the tiny model; kohya writes the names with `_` for `.`. Fused: qkv has
# 3·D output rows, linear1 3·D + 4·D.
SHAPES = {
    "double_blocks.{i}.img_attn.qkv": (D, 3 * D), "double_blocks.{i}.img_attn.proj": (D, D),
    "double_blocks.{i}.img_mlp.0": (D, 4 * D), "double_blocks.{i}.img_mlp.2": (4 * D, D),
    "double_blocks.{i}.img_mod.lin": (D, 6 * D), "double_blocks.{i}.txt_attn.qkv": (D, 3 * D),
    "double_blocks.{i}.txt_attn.proj": (D, D), "double_blocks.{i}.txt_mlp.0": (D, 4 * D),
    "double_blocks.{i}.txt_mlp.2": (4 * D, D), "double_blocks.{i}.txt_mod.lin": (D, 6 * D),
    "single_blocks.{i}.linear1": (D, 7 * D), "single_blocks.{i}.linear2": (5 * D, D),
    "single_blocks.{i}.modulation.lin": (D, 3 * D),
    "img_in": (CONFIG["in_channels"], D), "txt_in": (CONFIG["joint_attention_dim"], D),
    "time_in.in_layer": (256, D), "time_in.out_layer": (D, D),
    "vector_in.in_layer": (CONFIG["pooled_projection_dim"], D), "vector_in.out_layer": (D, D),
    "guidance_in.in_layer": (256, D), "guidance_in.out_layer": (D, D),
    "final_layer.linear": (D, CONFIG["in_channels"]), "final_layer.adaLN_modulation.1": (D, 2 * D),
}


def kohya(layer: str) -> str:
    return "lora_unet_" + layer.replace(".", "_")


def layer_lora(layer: str, rank: int, alpha: float | None, gen, split: int = 0) -> dict:
    """kohya tensors of one BFL layer: down [r, in], up [out, r] (block-diagonal over `split` parts of
    equal rank when given: the "sparse" fused LoRA diffusers detects) and alpha, when given."""
    d_in, d_out = SHAPES[re.sub(r"blocks\.\d+\.", "blocks.{i}.", layer)]
    up = torch.randn(d_out, rank, generator=gen) * 0.1
    if split:
        rows = [D] * 3 + ([4 * D] if split == 4 else [])
        up = up * torch.block_diag(*(torch.ones(n, rank // split) for n in rows))
    out = {"lora_down.weight": torch.randn(rank, d_in, generator=gen) * 0.1, "lora_up.weight": up}
    if alpha is not None:
        out["alpha"] = torch.tensor(alpha)
    return out


def flux_layers(gen) -> dict[str, dict]:
    """Every BFL layer kind of the tiny model (blocks 0 and 1 alternating), alpha ≠ rank and varying per
    layer; fused qkv and linear1 both dense and block-diagonal. diffusers ignores the final layer's
    alphas, so those have none (alpha = rank)."""
    layers = {}
    for j, pattern in enumerate(SHAPES):
        layer = pattern.format(i=j % 2)
        layers[layer] = layer_lora(layer, 4, None if layer.startswith("final_layer") else 1.0 + j, gen)
    layers["double_blocks.1.txt_attn.qkv"] = layer_lora("double_blocks.1.txt_attn.qkv", 6, 2.0, gen, split=3)
    layers["single_blocks.0.linear1"] = layer_lora("single_blocks.0.linear1", 8, 3.0, gen, split=4)
    layers["single_blocks.1.linear1"] = layer_lora("single_blocks.1.linear1", 4, 6.0, gen)
    return layers


def write(path, layers: dict, name, tail=lambda t: t) -> None:
    """`layers` as a safetensors file, keys `{name(layer)}.{tail(kohya tail)}`."""
    from safetensors.torch import save_file

    save_file({f"{name(layer)}.{tail(t)}": v for layer, parts in layers.items() for t, v in parts.items()}, path)


def test_kohya_matches_diffusers_conversion(flux, tmp_path, tiny_kohya_split):
    layers = flux_layers(torch.Generator().manual_seed(0))
    assert {re.sub(r"blocks\.\d+\.", "blocks.{i}.", layer) for layer in layers} == set(flux_conversion.ORIGINAL_MODULES)
    file = tmp_path / "kohya.safetensors"
    write(file, layers, kohya)
    loras = import_lora(file, params={"transformer": flux.params})
    modules = by_module(loras["transformer"])
    assert len(modules) == len(layers) + 2 * 2 + 2 * 3  # linear1 -> 4 modules, qkv -> 3

    def rank_alpha(module):
        return lora.rank(modules[module]), lora.alpha(modules[module])

    # Dense fused layers: every part keeps the rank and alpha; block-diagonal ones: rank r/n, alpha/n.
    assert rank_alpha("transformer_blocks.0.attn.to_k") == (4, 1.0)
    assert rank_alpha("single_transformer_blocks.1.proj_mlp") == (4, 6.0)
    assert rank_alpha("transformer_blocks.1.attn.add_v_proj") == (2, 2.0 / 3)
    assert rank_alpha("single_transformer_blocks.0.proj_mlp") == (2, 0.75)
    # Without params: the same adapters (the names come from the table, not from the model).
    jax.tree.map(np.testing.assert_array_equal, import_lora(file)["transformer"], loras["transformer"])
    assert_matches(flux, load_converted(flux, file), loras["transformer"], "kohya -> import")


def test_bfl_names_match_diffusers_conversion(flux, tmp_path, tiny_kohya_split):
    """`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (ComfyUI's FLUX form), and the same
    names bare and under `transformer.` or `base_model.model.`. diffusers 0.42 loads no FLUX.1 file of
    this form (it routes `diffusion_model.` keys only with kohya's `lora_down/lora_up` tails, as ComfyUI
    also writes them), so the oracle is that twin: the same tensors with `lora_down/lora_up` tails."""
    layers = flux_layers(torch.Generator().manual_seed(1))
    peft_tail = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}.get
    twin = tmp_path / "comfy_kohya_tails.safetensors"
    write(twin, layers, lambda layer: f"diffusion_model.{layer}")
    loras = {}
    for prefix in ("diffusion_model.", "transformer.", "base_model.model.", ""):
        file = tmp_path / f"bfl_{prefix or 'bare.'}safetensors"
        write(file, layers, lambda layer: f"{prefix}{layer}", tail=peft_tail)
        loras[prefix] = import_lora(file, params={"transformer": flux.params})["transformer"]
        jax.tree.map(np.testing.assert_array_equal, loras[prefix], loras["diffusion_model."])
    jax.tree.map(np.testing.assert_array_equal, import_lora(twin)["transformer"], loras["diffusion_model."])
    assert_matches(flux, load_converted(flux, twin), loras["diffusion_model."], "BFL names -> import")


def test_kohya_diffusers_names_match_diffusers_conversion(flux, tmp_path):
    """kohya's spelling of diffusers' names (`lora_transformer_transformer_blocks_0_attn_to_q`), which
    diffusers reads for attention and the layers around the blocks."""
    gen = torch.Generator().manual_seed(2)
    shapes = {m: shape for m, (_, shape) in lora.kernels(flux.params).items()}
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj",
               "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.to_add_out",
               "single_transformer_blocks.1.attn.to_v", "x_embedder", "context_embedder", "norm_out.linear",
               "proj_out", "time_text_embed.guidance_embedder.linear_1"]
    layers = {}
    for j, module in enumerate(modules):
        d_in, d_out = shapes[module]
        layers[module.replace(".", "_")] = {"lora_down.weight": torch.randn(4, d_in, generator=gen) * 0.1,
                                            "lora_up.weight": torch.randn(d_out, 4, generator=gen) * 0.1,
                                            "alpha": torch.tensor(1.0 + j)}
    file = tmp_path / "kohya_diffusers_names.safetensors"
    write(file, layers, lambda layer: f"lora_transformer_{layer}")
    loras = import_lora(file, params={"transformer": flux.params})
    assert sorted(by_module(loras["transformer"])) == sorted(modules)
    jax.tree.map(np.testing.assert_array_equal, import_lora(file)["transformer"], loras["transformer"])
    assert_matches(flux, load_converted(flux, file), loras["transformer"], "kohya diffusers names -> import")


def test_flux_keys_that_fit_no_layer_are_named(flux, tmp_path):
    gen = torch.Generator().manual_seed(3)
    cases = [
        # block 5 of a 2-block model
        ({kohya("double_blocks.5.img_attn.qkv"): layer_lora("double_blocks.0.img_attn.qkv", 4, 2.0, gen)},
         r"lora_unet_double_blocks_5_img_attn_qkv\.alpha.*match no Dense layer of the transformer params"),
        # a FLUX.1 root, but no layer of BFL's names
        ({"diffusion_model.double_blocks.0.img_attn.norm": layer_lora("double_blocks.0.img_attn.proj", 4, 2.0, gen)},
         r"diffusion_model\.double_blocks\.0\.img_attn\.norm\.alpha: names no FLUX\.1 layer"),
        # linear1 rows that are not 3·D + 4·D
        ({kohya("single_blocks.0.linear1"): {"lora_down.weight": torch.ones(4, D),
                                             "lora_up.weight": torch.ones(100, 4)}},
         r"single_blocks_0_linear1\.lora_down\.weight.*100 output rows do not split"),
        # a qkv of another model's width
        ({kohya("double_blocks.0.img_attn.qkv"): {"lora_down.weight": torch.ones(4, 20),
                                                  "lora_up.weight": torch.ones(60, 4)}},
         r"img_attn_qkv\.lora_down\.weight.*adapter 20 -> 20 does not fit transformer_blocks\.0\.attn\.to_q kernel"),
        # the same layer twice, under two spellings
        ({kohya("single_blocks.0.linear2"): layer_lora("single_blocks.0.linear2", 4, 2.0, gen),
          "diffusion_model.single_blocks.0.linear2": layer_lora("single_blocks.0.linear2", 4, 2.0, gen)},
         r"two A tensors for one module"),
    ]
    for i, (layers, match) in enumerate(cases):
        file = tmp_path / f"bad{i}.safetensors"
        write(file, layers, lambda layer: layer)
        with pytest.raises(ValueError, match=match) as e:
            import_lora(file, params={"transformer": flux.params})
        assert str(e.value).startswith(str(file)) and "\n" not in str(e.value), str(e.value)
