"""A tiny SD 2.x-style CTCAL set-up (random UNet + CLIP, real CLIP tokenizer, synthetic latents),
shared by the train-step tests and their 8-device subprocess."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from conversion import clip as clip_family
from conversion import unet as unet_family
from ctcal_jax import ctcal, lora, nouns, schedules
from ctcal_jax.families.unet import make_family
from ctcal_jax.optim import adamw_groups
from ctcal_jax.sharding import make_mesh, param_shardings
from ctcal_jax.train_step import init_state, make_train_step, place
from tiny import real_clip_tokenizer

UNET = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 32], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4], "cross_attention_dim": 32, "norm_num_groups": 8, "use_linear_projection": True,
}
CLIP = {
    "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 32,
}
PROMPTS = ["a cat and a dog on the left", "a red car next to a traffic light", "over there", "a giraffe"]
LEXICON = {"cat": "NOUN", "dog": "NOUN", "car": "NOUN", "traffic": "NOUN", "light": "NOUN", "giraffe": "NOUN",
           "left": "NOUN", "red": "ADJ"}


def tagger(prompt: str):
    """A dictionary tagger (the tests cannot download Stanza's models)."""
    out, pos = [], 0
    for word in prompt.split():
        start = prompt.index(word, pos)
        pos = start + len(word)
        out.append((word, LEXICON.get(word, "X"), start, pos))
    return out


def random_params(shapes, seed):
    """Random weights at a healthy scale (unit-variance activations), so attention maps have
    structure: norm scales near 1, fan-in-scaled kernels, small biases."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(path, s, key):
        name = jax.tree_util.keystr(path)
        noise = jax.random.normal(key, s.shape)
        if name.endswith("['scale']"):
            return 1.0 + 0.1 * noise
        if name.endswith("['bias']"):
            return 0.1 * noise
        if name.endswith("['kernel']"):
            return noise / np.sqrt(np.prod(s.shape[:-1]))
        return noise

    return jax.tree.unflatten(tree, [draw(p, s, k) for (p, s), k in zip(leaves, keys)])


def batch(batch_size: int = 4, seed: int = 0, latent: int = 32) -> dict[str, np.ndarray]:
    """Prompts cycled from `PROMPTS`, CLIP ids (SD 2.x tokenizer), noun arrays, latents `[B, latent, latent, 4]`."""
    tok = real_clip_tokenizer(pad_token="!")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    arrays = nouns.prepare_batch(prompts, tok, max_nouns=4, seq_len=77, tagger=tagger)
    latents = np.random.RandomState(seed).randn(batch_size, latent, latent, 4).astype(np.float32)
    return {"latents": latents, "input_ids": ids.astype(np.int32), **arrays}


def setup(data: int = 1, fsdp: int = 1, accum_steps: int = 1, config: ctcal.CTCALConfig | None = None,
          devices=None):
    """`SimpleNamespace(step, state, frozen, family, optimizer)` on a (data, fsdp) mesh."""
    unet = unet_family.build(UNET)
    text = clip_family.build(CLIP)
    frozen = {"unet": random_params(unet_family.abstract_params(unet, UNET), 0),
              "text_encoder": random_params(clip_family.abstract_params(text, CLIP), 1)}
    rng = jax.random.split(jax.random.key(2), 3)
    trainable = {
        "unet": lora.init(rng[0], frozen["unet"], rank=4, alpha=4),
        "text_encoder": lora.init(rng[1], frozen["text_encoder"], targets=r"self_attn\.(q|k|v|out)_proj$", rank=4, alpha=4),
        "ae": ctcal.init_autoencoder(rng[2], 16),
    }
    # B starts at zero (LoRA is a no-op at init); make it non-zero so the text path matters in tests.
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if jax.tree_util.keystr(p).endswith("['B']") else x, trainable)
    config = config or ctcal.default_config("sd2")
    family = make_family(unet, text, config, schedule=schedules.ddpm_schedule(), prediction_type="v_prediction")
    optimizer = adamw_groups(trainable, [(r"/alpha$", 0.0, 0.0), (r"^(unet|ae)/", 1e-3, 0.01),
                                         (r"^text_encoder/", 1e-4, 0.01)])
    mesh = make_mesh(data, fsdp, devices)
    frozen_sh = param_shardings(frozen, [(r".*/kernel$", ("fsdp_largest",)), (r".*", ())], mesh)
    state = init_state(trainable, optimizer)
    state_sh = param_shardings(state, [(r".*", ())], mesh)
    step = make_train_step(family, optimizer, place(frozen, frozen_sh), mesh=mesh, frozen_shardings=frozen_sh,
                           state_shardings=state_sh, accum_steps=accum_steps)
    return SimpleNamespace(step=step, state=place(state, state_sh), frozen=frozen, family=family, optimizer=optimizer)
