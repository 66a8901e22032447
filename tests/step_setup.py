"""Tiny CTCAL set-ups for the train-step tests and their 8-device subprocess: random models at a
healthy scale, the real CLIP tokenizer, a tiny T5 tokenizer, synthetic latents.

- "sd2": SD 2.x-style UNet + CLIP, DDPM v-prediction, 16×16 maps.
- "sd3": SD3-style MM-DiT + CLIP-L + CLIP-G (+ precomputed T5 stream), flow matching, 16×16 maps.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from conversion import clip as clip_family
from conversion import mmdit as mmdit_family
from conversion import unet as unet_family
from conversion.tiny import random_params
from ctcal_jax import builder, ctcal, nouns, text
from ctcal_jax import config as config_lib
from tiny import real_clip_tokenizer, tag_words, tiny_t5_tokenizer

UNET = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 32], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4], "cross_attention_dim": 32, "norm_num_groups": 8, "use_linear_projection": True,
}
MMDIT = {
    "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48, "caption_projection_dim": 32,
    "pooled_projection_dim": 32, "pos_embed_max_size": 16,
}


def _clip(hidden: int, projected: bool) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
            "vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 16}


PROMPTS = ["a cat and a dog on the left", "a red car next to a traffic light", "over there", "a giraffe"]
LEXICON = {"cat": "NOUN", "dog": "NOUN", "car": "NOUN", "traffic": "NOUN", "light": "NOUN", "giraffe": "NOUN",
           "left": "NOUN", "red": "ADJ"}


tagger = functools.partial(tag_words, LEXICON)


def _t5_tokenizer():
    return tiny_t5_tokenizer(Path(tempfile.mkdtemp(prefix="t5tok_")))


def batch(family: str = "sd2", batch_size: int = 4, seed: int = 0, latent: int = 32) -> dict:
    """Prompts cycled from `PROMPTS`: token ids, noun arrays per text stream, latents
    `[B, latent, latent, C]` (and a random precomputed T5 stream for SD3)."""
    clip = real_clip_tokenizer(pad_token="!")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    ids = text.tokenize(clip, prompts, 77)["input_ids"]
    rng = np.random.RandomState(seed)
    clip_arrays = nouns.prepare_batch(prompts, clip, max_nouns=4, seq_len=77, tagger=tagger)
    if family == "sd2":
        return {"latents": rng.randn(batch_size, latent, latent, 4).astype(np.float32),
                "input_ids": {"text_encoder": ids}, **clip_arrays}
    t5 = nouns.prepare_batch(prompts, _t5_tokenizer(), max_nouns=4, seq_len=256, tagger=tagger)
    return {
        "latents": rng.randn(batch_size, latent, latent, 16).astype(np.float32),
        "input_ids": {"text_encoder": ids, "text_encoder_2": ids},
        "t5_embeds": rng.randn(batch_size, 256, MMDIT["joint_attention_dim"]).astype(np.float32),
        "noun_weights_clip": clip_arrays["noun_weights"], "token_mask_clip": clip_arrays["token_mask"],
        "noun_weights_t5": t5["noun_weights"], "token_mask_t5": t5["token_mask"],
    }


def _models(family: str, dtype):
    """(denoiser name, denoiser, frozen params, PromptEncoders); modules compute in `dtype`."""
    if family == "sd2":
        cfgs = {"text_encoder": _clip(32, False)}
        denoiser, name = unet_family.build(UNET, dtype), "unet"
        shapes = unet_family.abstract_params(denoiser, UNET)
    else:
        cfgs = {"text_encoder": _clip(16, True), "text_encoder_2": _clip(32, True)}
        denoiser, name = mmdit_family.build(MMDIT, dtype), "transformer"
        shapes = mmdit_family.abstract_params(denoiser, MMDIT)
    models = {c: clip_family.build(cfg, dtype) for c, cfg in cfgs.items()}
    frozen = {name: random_params(shapes, 0)}
    for i, (c, m) in enumerate(models.items()):
        frozen[c] = random_params(clip_family.abstract_params(m, cfgs[c]), 1 + i)
    encoders = text.PromptEncoders(
        family="sd" if family == "sd2" else "sd3", tokenizers={}, models=models,
        max_lengths={c: 77 for c in models} | ({} if family == "sd2" else {"text_encoder_3": 256}),
        joint_attention_dim=None if family == "sd2" else MMDIT["joint_attention_dim"])
    return name, denoiser, jax.tree.map(jnp.asarray, frozen), encoders


def pipeline(family: str = "sd2", compute_dtype=jnp.float32) -> builder.Pipeline:
    """The tiny random pipeline of `family` as the builder takes it (float32 weights)."""
    _, denoiser, frozen, encoders = _models(family, compute_dtype)
    scheduler = {"prediction_type": "v_prediction"} if family == "sd2" else {"shift": 3.0}
    return builder.Pipeline(family, denoiser, encoders, frozen, scheduler)


def train_config(family: str = "sd2", data: int = 1, fsdp: int = 1, accum_steps: int = 1,
           ctcal_config: ctcal.CTCALConfig | None = None, remat: str = "none"):
    """The training config of these tests: LoRA rank 4 on the denoiser's attention and the CLIP
    self-attention, AdamW 1e-3 / 1e-4; SD3 with a low fixed teacher (below) unless `ctcal_config`."""
    c = config_lib.base_config()
    name = builder.DENOISER[family]
    c.optim.groups = ((rf"^({name}|ae)/", 1e-3, 0.01), (r"^text_encoder", 1e-4, 0.01))
    c.mesh.data, c.mesh.fsdp, c.optim.accum_steps, c.model.remat = data, fsdp, accum_steps, remat
    if family == "sd3":
        # The fixed SD3 teacher (t = 570.6 at shift 3) leaves few small-t_stu samples in a tiny batch;
        # the tests use a low fixed teacher so every sample has a CTCAL term.
        ctcal_config = ctcal_config or dataclasses.replace(ctcal.default_config("sd3"), teacher_t=0.0)
    return config_lib.set_ctcal(c, ctcal_config or ctcal.default_config("sd2"))


def setup(family: str = "sd2", data: int = 1, fsdp: int = 1, accum_steps: int = 1,
          config: ctcal.CTCALConfig | None = None, devices=None, compute_dtype=jnp.float32,
          remat: str = "none") -> SimpleNamespace:
    """`SimpleNamespace(step, state, frozen, family, optimizer)` from `builder.build` on a (data, fsdp)
    mesh; frozen and trainable weights are float32 whatever `compute_dtype` the models run in."""
    pipe = pipeline(family, compute_dtype)
    cfg = train_config(family, data, fsdp, accum_steps, config, remat)
    trainable = builder.init_trainable(cfg, pipe, jax.random.key(2))
    # B starts at zero (LoRA is a no-op at init); make it non-zero so the adapters matter in tests.
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if jax.tree_util.keystr(p).endswith("['B']") else x, trainable)
    mesh = builder.mesh_from_config(cfg, devices)
    run = builder.build(cfg, pipe, mesh=mesh, trainable=trainable)
    return SimpleNamespace(step=run.step, state=run.state, frozen=pipe.params, family=run.family,
                           optimizer=run.optimizer)
