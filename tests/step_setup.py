"""Tiny CTCAL set-ups for the train-step tests and their 8-device subprocess: random models at a
healthy scale, the real CLIP tokenizer, a tiny T5 tokenizer, synthetic latents.

- "sd2": SD 2.x-style UNet + CLIP, DDPM v-prediction, 16×16 maps.
- "sd3": SD3-style MM-DiT + CLIP-L + CLIP-G (+ precomputed T5 stream), flow matching, 16×16 maps.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from conversion import clip as clip_family
from conversion import mmdit as mmdit_family
from conversion import unet as unet_family
from ctcal_jax import ctcal, lora, nouns, schedules, text
from ctcal_jax.demo import random_params
from ctcal_jax.families import mmdit as sd3_step
from ctcal_jax.families import unet as sd2_step
from ctcal_jax.optim import adamw_groups
from ctcal_jax.sharding import make_mesh, param_shardings
from ctcal_jax.train_step import init_state, make_train_step, place
from tiny import real_clip_tokenizer, tiny_t5_tokenizer

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
TEXT_LORA = r"self_attn\.(q|k|v|out)_proj$"


def tagger(prompt: str):
    """A dictionary tagger (the tests cannot download Stanza's models)."""
    out, pos = [], 0
    for word in prompt.split():
        start = prompt.index(word, pos)
        pos = start + len(word)
        out.append((word, LEXICON.get(word, "X"), start, pos))
    return out


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
    return name, denoiser, frozen, encoders


def setup(family: str = "sd2", data: int = 1, fsdp: int = 1, accum_steps: int = 1,
          config: ctcal.CTCALConfig | None = None, devices=None, compute_dtype=jnp.float32,
          remat: str = "none") -> SimpleNamespace:
    """`SimpleNamespace(step, state, frozen, family, optimizer)` on a (data, fsdp) mesh; frozen and
    trainable weights are float32 whatever `compute_dtype` the models run in; `remat` goes to the family."""
    name, denoiser, frozen, encoders = _models(family, compute_dtype)
    rng = jax.random.split(jax.random.key(2), 2 + len(encoders.models))
    trainable = {name: lora.init(rng[0], frozen[name], rank=4, alpha=4), "ae": ctcal.init_autoencoder(rng[1], 16)}
    for key, c in zip(rng[2:], encoders.models):
        trainable[c] = lora.init(key, frozen[c], targets=TEXT_LORA, rank=4, alpha=4)
    # B starts at zero (LoRA is a no-op at init); make it non-zero so the adapters matter in tests.
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if jax.tree_util.keystr(p).endswith("['B']") else x, trainable)
    if family == "sd2":
        config = config or ctcal.default_config("sd2")
        fam = sd2_step.make_family(denoiser, encoders, config, schedule=schedules.ddpm_schedule(),
                                   prediction_type="v_prediction", remat=remat)
    else:
        # The fixed SD3 teacher (t = 570.6 at shift 3) leaves few small-t_stu samples in a tiny batch;
        # the tests use a low fixed teacher so every sample has a CTCAL term.
        config = config or ctcal.CTCALConfig(**{**ctcal.default_config("sd3").__dict__, "teacher_t": 0.0})
        fam = sd3_step.make_family(denoiser, encoders, config, remat=remat)
    optimizer = adamw_groups(trainable, [(rf"^({name}|ae)/", 1e-3, 0.01), (r"^text_encoder", 1e-4, 0.01)])
    mesh = make_mesh(data, fsdp, devices)
    frozen_sh = param_shardings(frozen, [(r".*/kernel$", ("fsdp_largest",)), (r".*", ())], mesh)
    state = init_state(trainable, optimizer)
    state_sh = param_shardings(state, [(r".*", ())], mesh)
    step = make_train_step(fam, optimizer, place(frozen, frozen_sh), mesh=mesh, frozen_shardings=frozen_sh,
                           state_shardings=state_sh, accum_steps=accum_steps)
    return SimpleNamespace(step=step, state=place(state, state_sh), frozen=frozen, family=fam, optimizer=optimizer)
