"""`make demo`: a short CTCAL LoRA run on a tiny SD 2.x-style model, offline, on a CPU, in ~2 minutes.

What it does, end to end, with the code paths a real run takes:
1. writes a tiny UNet and CLIP text encoder as diffusers/transformers folders (config.json +
   safetensors, seeded random weights: nothing can be downloaded here), without torch;
2. loads them back with `conversion.load_component`;
3. tokenizes eight prompts with the real CLIP tokenizer and turns their nouns into the step's token
   arrays (`nouns.prepare_batch`; the nouns come with the data, `given=`, since Stanza's models are
   not available offline);
4. trains LoRA adapters (UNet attention, CLIP self-attention) and the map autoencoder with the
   sharded CTCAL train step on synthetic latents, logging `metrics.jsonl`;
5. exports the LoRA in diffusers format (`lora/pytorch_lora_weights.safetensors`) and draws each
   noun's 16×16 map before and after training (`maps.png`).

The weights are random, so the maps show the machinery, not a trained model's layout. Once the
trainer CLI lands, `make demo` runs `python -m ctcal_jax.train --config configs/demo.py`.

    python -m ctcal_jax.demo --out out/demo [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from conversion import export_lora, files, load_component, names
from conversion import clip as clip_family
from conversion import unet as unet_family
from ctcal_jax import ctcal, lora, nouns, schedules, text
from ctcal_jax.attention import AttnCapture
from ctcal_jax.families.unet import make_family
from ctcal_jax.optim import adamw_groups
from ctcal_jax.sharding import make_mesh, param_shardings
from ctcal_jax.tokenizers import clip_tokenizer
from ctcal_jax.train_step import init_state, make_train_step, place

# A 3-level UNet in SD 2.x's layout (linear projections, per-block heads) at 1/10 of its width.
UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": 32,
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4, 4], "cross_attention_dim": 64, "use_linear_projection": True,
}
CLIP = {
    "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
# Prompts and the nouns the data names for them (compounds are one subject).
DATA = [
    ("a cat and a dog on a sofa", ["cat", "dog", "sofa"]),
    ("a red car next to a traffic light", ["car", "traffic light"]),
    ("a giraffe and a zebra in a field", ["giraffe", "zebra", "field"]),
    ("a teddy bear on a bed", ["teddy bear", "bed"]),
    ("a bowl of apples beside a vase", ["bowl", "apples", "vase"]),
    ("a horse in front of a barn", ["horse", "barn"]),
    ("a laptop and a cup on a desk", ["laptop", "cup", "desk"]),
    ("a boat under a bridge", ["boat", "bridge"]),
]


def random_params(shapes: Any, seed: int) -> Any:
    """Seeded random weights at a healthy scale (unit-variance activations, so attention maps have
    structure): norm scales near 1, fan-in-scaled kernels, small biases, unit embeddings."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(path, shape, key):
        name = jax.tree_util.keystr(path)
        noise = jax.random.normal(key, shape.shape)
        if name.endswith("['scale']"):
            return 1.0 + 0.1 * noise
        if name.endswith("['bias']"):
            return 0.1 * noise
        if name.endswith("['kernel']"):
            return noise / np.sqrt(np.prod(shape.shape[:-1]))
        return noise

    return jax.tree.unflatten(tree, [draw(p, s, k) for (p, s), k in zip(leaves, keys)])


def write_component(folder: Path, config: dict, family: Any, weights_file: str, seed: int) -> None:
    """A diffusers/transformers component folder with seeded random weights, written without torch."""
    module = family.build(config)
    params = random_params(family.abstract_params(module, config), seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    files.write_safetensors(folder / weights_file, names.flax_to_torch(params))


def synthetic_latents(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 32×32×4 fields (low-frequency noise), standing in for VAE latents."""
    coarse = np.random.RandomState(seed).randn(n, 4, 4, 4).astype(np.float32)
    return np.asarray(jax.image.resize(coarse, (n, 32, 32, 4), "bicubic"))


def noun_maps(unet, variables, batch, t: int) -> np.ndarray:
    """`[N, 16, 16]` smoothed, min-max normalised maps of the first prompt's nouns at timestep t."""
    x = batch["latents"][:1]
    ctx = batch["context"][:1]
    _, aux = unet.apply(variables, x, jnp.array([t]), ctx, capture=AttnCapture(resolutions=(16,)))
    weights = batch["noun_weights"][:1]
    maps = ctcal.minmax_normalize(ctcal.gaussian_smooth(ctcal.group_mean(aux["attn"], weights)))
    n = int((np.asarray(weights[0]).sum(-1) > 0).sum())
    return np.asarray(maps[0, ..., :n]).transpose(2, 0, 1)


def maps_png(rows: list[np.ndarray], file: Path, scale: int = 8) -> None:
    """Rows of `[N, h, w]` maps in [0, 1] as a grey-scale PNG grid."""
    grid = np.concatenate([np.concatenate([np.pad(m, 1) for m in row], axis=1) for row in rows], axis=0)
    img = Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8))
    img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    write_component(out / "model" / "unet", UNET, unet_family, "diffusion_pytorch_model.safetensors", seed=0)
    write_component(out / "model" / "text_encoder", CLIP, clip_family, "model.safetensors", seed=1)
    unet, unet_params = load_component(out / "model" / "unet", "unet")
    text_model, text_params = load_component(out / "model" / "text_encoder", "text_encoder")
    print(f"loaded {out / 'model'}: UNet {sum(p.size for p in jax.tree.leaves(unet_params)):,} and "
          f"CLIP {sum(p.size for p in jax.tree.leaves(text_params)):,} parameters")

    tokenizer = clip_tokenizer(pad_token="!")
    prompts, given = [p for p, _ in DATA], [g for _, g in DATA]
    host_batch = {
        "latents": synthetic_latents(len(DATA)),
        "input_ids": {"text_encoder": text.tokenize(tokenizer, prompts, 77)["input_ids"]},
        **nouns.prepare_batch(prompts, tokenizer, max_nouns=4, seq_len=77, given=given),
    }

    encoders = text.PromptEncoders("sd", {"text_encoder": tokenizer}, {"text_encoder": text_model},
                                   {"text_encoder": 77})
    frozen = {"unet": unet_params, "text_encoder": text_params}
    rng = jax.random.split(jax.random.key(0), 3)
    trainable = {
        "unet": lora.init(rng[0], unet_params, rank=4, alpha=4),
        "text_encoder": lora.init(rng[1], text_params, targets=r"self_attn\.(q|k|v|out)_proj$", rank=4, alpha=4),
        "ae": ctcal.init_autoencoder(rng[2], 16),
    }
    config = ctcal.default_config("sd2")
    family = make_family(unet, encoders, config, schedule=schedules.ddpm_schedule(), prediction_type="v_prediction")
    # SPEC §3 learning rates ×20: a 30-step demo, not a 50 000-step run.
    optimizer = adamw_groups(trainable, [(r"^(unet|ae)/", 1e-3, 0.01), (r"^text_encoder/", 1e-4, 0.01)])
    mesh = make_mesh(data=-1, fsdp=1)
    frozen_sh = param_shardings(frozen, [(r".*/kernel$", ("fsdp_largest",)), (r".*", ())], mesh)
    state = init_state(trainable, optimizer)
    state_sh = param_shardings(state, [(r".*", ())], mesh)
    step = make_train_step(family, optimizer, place(frozen, frozen_sh), mesh=mesh,
                           frozen_shardings=frozen_sh, state_shardings=state_sh)

    def probe(trained, t):
        ctx = text.encode_prompts(encoders, {"text_encoder": text_params}, host_batch["input_ids"],
                                  lora={"text_encoder": trained["text_encoder"]})["prompt_embeds"]
        return noun_maps(unet, {"params": unet_params, "lora": trained["unet"]}, {**host_batch, "context": ctx}, t)

    before = [probe(state["params"], t) for t in (0, 800)]

    log = open(out / "metrics.jsonl", "w")
    start = time.time()
    state = place(state, state_sh)
    for i in range(1, args.steps + 1):
        state, metrics = step(state, host_batch, jax.random.key(1))
        if i % args.log_every == 0 or i == 1:
            row = {"step": i, **{k: round(float(v), 6) for k, v in metrics.items()}}
            if not all(np.isfinite(v) for v in row.values()):
                raise FloatingPointError(f"non-finite metrics at step {i}: {row}")
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"step {i:3d}  loss {row['loss']:.4f}  diffusion {row['diffusion']:.4f}  "
                  f"ctcal {row['ctcal']:.4f}  ({time.time() - start:.0f} s)")
    log.close()

    params = jax.device_get(state["params"])
    export_lora(out / "lora", {"unet": params["unet"], "text_encoder": params["text_encoder"]})
    after = [probe(params, t) for t in (0, 800)]
    maps_png(before + after, out / "maps.png")
    print(f"wrote {out / 'metrics.jsonl'}, {out / 'lora' / 'pytorch_lora_weights.safetensors'} and "
          f"{out / 'maps.png'} (rows: t=0 and t=800 before training, then after; one column per noun of "
          f"{prompts[0]!r})")


if __name__ == "__main__":
    main()
