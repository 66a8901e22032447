"""Built-in tiny pipelines (`model.pretrained = "builtin:tiny-sd2"` / `"builtin:tiny-sd3"` /
`"builtin:tiny-flux"`): complete diffusers folders with seeded random weights, written without torch,
for CPU runs and tests.

Each is a real pipeline folder — `model_index.json`, `scheduler/`, `tokenizer/` (the real CLIP
vocabulary), `text_encoder/`, `unet/` or `transformer/`, `vae/`, safetensors weights; tiny-flux adds
a tiny T5 as `text_encoder_2` with a small Unigram `tokenizer_2` (T5's special ids, built here) —
that diffusers' `DiffusionPipeline.from_pretrained` loads, so a LoRA trained on it can be checked in
diffusers. The weights are random at a trained model's scale (unit-variance activations, so
attention maps have structure): they show the machinery, not a trained model's layout.
Deterministic: the same name always gives the same bytes. `materialize(name)` writes one once into a
cache folder (atomically: a half-written folder is never visible) and returns its path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from conversion import clip as clip_family
from conversion import files, names
from conversion import flux as flux_family
from conversion import mmdit as mmdit_family
from conversion import t5 as t5_family
from conversion import unet as unet_family
from conversion import vae as vae_family
from ctcal_jax.tokenizers import clip_tokenizer

VERSION = 1  # bump when a config below changes: the cache folder name carries it

# A 3-level UNet in SD 2.x's layout (linear projections, per-block heads) at 1/10 of its width;
# 32×32 latents (256 px images), 16×16 maps at the second level.
UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": 32,
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4, 4], "cross_attention_dim": 64, "use_linear_projection": True,
}
MMDIT = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 32, "patch_size": 2, "in_channels": 16,
    "out_channels": 16, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
    "joint_attention_dim": 64, "caption_projection_dim": 32, "pooled_projection_dim": 48, "pos_embed_max_size": 16,
}
# FLUX.1-dev's layout (guidance embedding, double then single blocks, 3-axis RoPE) at a tiny width:
# the T5 width 32 in, CLIP-L's pooled 32.
FLUX = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 1,
    "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
    "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6],
}


def _clip(hidden: int, projection: int | None = None) -> dict[str, Any]:
    """A 2-layer CLIP text model; with `projection`, `CLIPTextModelWithProjection` (SD3's pooled)."""
    return {"architectures": ["CLIPTextModel" if projection is None else "CLIPTextModelWithProjection"],
            "vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": projection or hidden}


# The tiny T5 tokenizer's pieces (after T5's `<pad>`, `</s>`, `<unk>`): "▁" (a word start), a few
# whole words, then every letter, digit and punctuation mark with and without the word start, so
# that any ASCII prompt tokenizes. Unigram scores: whole words win over their letters.
_T5_WORDS = ("a an the of and on in with to next above below near under over beside photo cat dog bird "
             "apple banana car bench book cup kite lake tree house boat red blue green yellow black white "
             "small large two three").split()
_T5_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + \
    list("0123456789.,;:!?'\"-()&/")
T5_VOCAB = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
            + [("\u2581" + w, -5.0) for w in _T5_WORDS] + [("\u2581" + c, -8.0) for c in _T5_CHARS]
            + [(c, -9.0) for c in _T5_CHARS])
T5_EXTRA_IDS = 100  # T5's sentinel tokens `<extra_id_i>`, after the vocabulary
T5_TOKENIZER = "t5"  # a `tokenizers` entry: the tiny T5 tokenizer instead of CLIP's


def t5_tokenizer() -> Any:
    """The tiny T5 tokenizer (transformers `T5TokenizerFast`, Unigram over `T5_VOCAB`), built offline."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=list(T5_VOCAB), extra_ids=T5_EXTRA_IDS)


def _t5(d_model: int) -> dict[str, Any]:
    """A 2-layer T5 v1.1 encoder (gated GELU, as T5-XXL), its vocabulary the tiny tokenizer's."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": len(T5_VOCAB) + T5_EXTRA_IDS,
            "d_model": d_model, "d_kv": 8, "d_ff": 2 * d_model, "num_layers": 2, "num_heads": 4,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def _vae(latent_channels: int, scaling: float, shift: float | None) -> dict[str, Any]:
    """Four levels (8× down-sampling, as every SD VAE), 16–32 channels."""
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "latent_channels": latent_channels,
            "norm_num_groups": 8, "sample_size": 256, "scaling_factor": scaling, "shift_factor": shift,
            "use_quant_conv": shift is None, "use_post_quant_conv": shift is None}


SD2_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                 "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1-dev's scheduler_config.json: the shift grows with the image token count.
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}

PIPELINES: dict[str, dict[str, Any]] = {
    "tiny-sd2": {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": SD2_SCHEDULER,
        "components": {
            "unet": (UNET, unet_family, "diffusion_pytorch_model.safetensors"),
            "text_encoder": (_clip(64), clip_family, "model.safetensors"),
            "vae": (_vae(4, 0.18215, None), vae_family, "diffusion_pytorch_model.safetensors"),
        },
        "tokenizers": {"tokenizer": "!"},  # SD 2.x pads with "!"
        "none": ("safety_checker", "feature_extractor", "image_encoder"),
    },
    "tiny-sd3": {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": SD3_SCHEDULER,
        "components": {
            "transformer": (MMDIT, mmdit_family, "diffusion_pytorch_model.safetensors"),
            "text_encoder": (_clip(16, projection=16), clip_family, "model.safetensors"),
            "text_encoder_2": (_clip(32, projection=32), clip_family, "model.safetensors"),
            "vae": (_vae(16, 1.5305, 0.0609), vae_family, "diffusion_pytorch_model.safetensors"),
        },
        "tokenizers": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "none": ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"),
    },
    "tiny-flux": {
        "_class_name": "FluxPipeline",
        "scheduler": FLUX_SCHEDULER,
        "components": {
            "transformer": (FLUX, flux_family, "diffusion_pytorch_model.safetensors"),
            "text_encoder": (_clip(32), clip_family, "model.safetensors"),
            "text_encoder_2": (_t5(32), t5_family, "model.safetensors"),
            "vae": (_vae(16, 0.3611, 0.1159), vae_family, "diffusion_pytorch_model.safetensors"),
        },
        "tokenizers": {"tokenizer": "<|endoftext|>", "tokenizer_2": T5_TOKENIZER},
        "none": ("image_encoder", "feature_extractor"),
    },
}

_LIBRARY = {"unet": "diffusers", "transformer": "diffusers", "vae": "diffusers", "scheduler": "diffusers"}


def random_params(shapes: Any, seed: int) -> Any:
    """Seeded random weights at a healthy scale: norm scales near 1, fan-in-scaled kernels, small
    biases, unit embeddings (float32 numpy arrays, the tree of `shapes`)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(shape.shape, dtype=np.float32)
        if name.endswith("['scale']"):
            return 1.0 + 0.1 * noise
        if name.endswith("['bias']"):
            return 0.1 * noise
        if name.endswith("['kernel']"):
            return noise / np.float32(np.sqrt(np.prod(shape.shape[:-1])))
        return noise

    return jax.tree.unflatten(tree, [draw(p, s) for p, s in leaves])


def fold_t5_attention_scale(params: Any, d_kv: int) -> Any:
    """T5's attention has no 1/√d: its initialisation (and so a trained T5) folds it into the query
    projection (transformers' `_init_weights`: q's std (d_model·d_kv)^-0.5). Scaling `random_params`'
    q kernels the same keeps the logits at a trained model's size (and float32 round-off small)."""
    scale = np.float32(d_kv ** -0.5)

    def fold(path, x):
        return x * scale if jax.tree_util.keystr(path).endswith("['SelfAttention']['q']['kernel']") else x

    return jax.tree_util.tree_map_with_path(fold, params)


def write_component(folder: Path, config: dict[str, Any], params: Any, weights_file: str, dtype: Any = np.float32) -> None:
    """A diffusers/transformers component folder: `config.json` and the Flax `params` as the torch
    state dict (`dtype` on disk), written without torch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: np.asarray(v, dtype) for k, v in names.flax_to_torch(params).items()}
    files.write_safetensors(folder / weights_file, state)


def write_folder(out: Path, spec: dict[str, Any], params: dict[str, Any], dtype: Any = np.float32) -> Path:
    """A complete pipeline folder at `out` (which must not exist) from a `PIPELINES`-style `spec`
    (configs, tokenizers' pad tokens, scheduler) and `params` by component."""
    out.mkdir(parents=True)
    index: dict[str, Any] = {"_class_name": spec["_class_name"], "_diffusers_version": "0.42.1"}
    for component, (config, _, weights) in spec["components"].items():
        write_component(out / component, config, params[component], weights, dtype)
        cls = config.get("_class_name") or config["architectures"][0]
        index[component] = [_LIBRARY.get(component, "transformers"), cls]
    for component, pad in spec["tokenizers"].items():  # CLIP's pad token, or T5_TOKENIZER
        tokenizer = t5_tokenizer() if pad == T5_TOKENIZER else clip_tokenizer(pad_token=pad)
        tokenizer.save_pretrained(out / component)
        index[component] = ["transformers", "T5TokenizerFast" if pad == T5_TOKENIZER else "CLIPTokenizer"]
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2))
    index["scheduler"] = ["diffusers", spec["scheduler"]["_class_name"]]
    for component in spec["none"]:
        index[component] = [None, None]
    if spec["_class_name"] == "StableDiffusionPipeline":
        index["requires_safety_checker"] = False
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def write_pipeline(name: str, out: Path) -> Path:
    """Write the built-in pipeline `name` as a diffusers folder at `out` (which must not exist)."""
    if name not in PIPELINES:
        raise ValueError(f"unknown built-in pipeline {name!r}; available: {sorted(PIPELINES)}")
    spec = PIPELINES[name]
    params = {}
    for seed, (component, (config, family, _)) in enumerate(spec["components"].items()):
        params[component] = random_params(family.abstract_params(family.build(config), config), seed)
        if family is t5_family:
            params[component] = fold_t5_attention_scale(params[component], config["d_kv"])
    return write_folder(out, spec, params)


def cache_dir() -> Path:
    """`$CTCAL_JAX_CACHE`, else `$XDG_CACHE_HOME/ctcal_jax`, else `~/.cache/ctcal_jax`."""
    if os.environ.get("CTCAL_JAX_CACHE"):
        return Path(os.environ["CTCAL_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctcal_jax"


def materialize(name: str, root: Path | None = None) -> Path:
    """The folder of built-in pipeline `name`, written on first use (module docstring)."""
    if name not in PIPELINES:
        raise ValueError(f"unknown built-in pipeline 'builtin:{name}'; available: "
                         f"{['builtin:' + n for n in sorted(PIPELINES)]}")
    folder = (root or cache_dir()) / f"{name}-v{VERSION}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        write_pipeline(name, tmp / "pipeline")
        try:
            os.rename(tmp / "pipeline", folder)
        except OSError:
            if not folder.is_dir():  # another process won the race: its folder is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
