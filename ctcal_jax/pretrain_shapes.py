"""Pretrain the shapes world's base models from scratch: `python -m ctcal_jax.pretrain_shapes --out DIR`.

The project ships what this writes (`ctcal_jax/assets/`, loaded as `builtin:shapes-sd2` and
`builtin:shapes-sd3`); the demo and the shapes experiment start from those files. It writes:

- `DIR/shapes-sd2/`: a `StableDiffusionPipeline` folder: an SD 2.x-layout UNet (cross-attention at
  16×16 and 8×8, v-prediction, DDIM), a 2-layer CLIP text encoder with the real CLIP tokenizer, and a
  small VAE (32×32×3 images <-> 16×16×4 latents).
- `DIR/shapes-sd3/`: a `StableDiffusion3Pipeline` folder: a 4-block MM-DiT (flow matching, 2×2
  patches: an 8×8 image grid), two CLIP encoders (the pooled and penultimate outputs as SD3 takes
  them; no T5, so the T5 stream is zeros, as diffusers does without `text_encoder_3`), the same VAE.
- `DIR/report.json`: per stage its steps, batch, seconds and final loss; then the evaluator's
  accuracies (`ctcal_jax.data.shapes_eval.score`) on the validation prompt sets of every category,
  sampled from the folders as written (float16 weights, as shipped).

Stages, all on device with the data held there (no host work per step):
1. the world: `--rows` training scenes of `data.shapes` (train split: held-out compositions never
   appear), rendered at 32×32, their prompts tokenized;
2. the VAE: L2 reconstruction + a small KL term; `scaling_factor` = 1/std of the latents (and for
   SD3 `shift_factor` = their mean), as the SD VAEs were calibrated;
3. UNet + CLIP jointly from scratch with the diffusion loss (v-prediction, 10 % empty prompts so
   classifier-free guidance works), AdamW with warm-up and cosine decay, an EMA of the weights;
4. MM-DiT + two CLIPs the same way with the flow-matching loss (logit-normal timesteps, shift 3).
Rows of the token embedding that no prompt of the world uses are set to zero (nothing trained
them): the weights compress to the part the world uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conversion import clip as clip_family
from conversion import mmdit as mmdit_family
from conversion import tiny
from conversion import unet as unet_family
from conversion import vae as vae_family
from ctcal_jax import schedules, text
from ctcal_jax.data import shapes, shapes_eval
from ctcal_jax.tokenizers import clip_tokenizer

IMAGE = 32  # pixels; latents are 16×16

VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
       "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
       "block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 16,
       "sample_size": IMAGE, "scaling_factor": 1.0, "shift_factor": None}
UNET = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": IMAGE // 2,
        "block_out_channels": [64, 128], "layers_per_block": 1, "norm_num_groups": 16,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": [4, 8], "cross_attention_dim": 64, "use_linear_projection": True}
MMDIT = {"_class_name": "SD3Transformer2DModel", "sample_size": IMAGE // 2, "patch_size": 2, "in_channels": 4,
         "out_channels": 4, "num_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
         "joint_attention_dim": 64, "caption_projection_dim": 128, "pooled_projection_dim": 64,
         "pos_embed_max_size": 16}
SD2_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                 "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def _clip(hidden: int, projection: bool) -> dict[str, Any]:
    return {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
            "vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": hidden}


def specs(vae_sd2: dict[str, Any], vae_sd3: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The two folders as `conversion.tiny.write_folder` specs (the VAE configs carry the calibration)."""
    weights = "diffusion_pytorch_model.safetensors"
    return {
        "shapes-sd2": {
            "_class_name": "StableDiffusionPipeline", "scheduler": SD2_SCHEDULER,
            "components": {"unet": (UNET, unet_family, weights),
                           "text_encoder": (_clip(64, False), clip_family, "model.safetensors"),
                           "vae": (vae_sd2, vae_family, weights)},
            "tokenizers": {"tokenizer": "!"},
            "none": ("safety_checker", "feature_extractor", "image_encoder"),
        },
        "shapes-sd3": {
            "_class_name": "StableDiffusion3Pipeline", "scheduler": SD3_SCHEDULER,
            "components": {"transformer": (MMDIT, mmdit_family, weights),
                           "text_encoder": (_clip(32, True), clip_family, "model.safetensors"),
                           "text_encoder_2": (_clip(32, True), clip_family, "model.safetensors"),
                           "vae": (vae_sd3, vae_family, weights)},
            "tokenizers": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
            "none": ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"),
        },
    }


@dataclasses.dataclass(frozen=True)
class Settings:
    """Steps and sizes of each stage (the command line's flags)."""

    rows: int = 50_000
    vae_steps: int = 4000
    sd2_steps: int = 10_000
    sd3_steps: int = 10_000
    batch: int = 128
    vae_batch: int = 64
    lr: float = 5e-4
    ema: float = 0.999
    seed: int = 0
    eval_n: int = 64  # validation prompts per category
    eval_steps: int = 25
    guidance: float = 5.0
    log_every: int = 500


def world(rows: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`rows` training scenes: images uint8 `[N, 32, 32, 3]` and their prompts."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_scene(rng, "train", size=IMAGE) for _ in range(rows)]
    images = np.stack([shapes.render(s, IMAGE)[0] for s in scenes])
    return images, [s.prompt for s in scenes]


# Modules are initialised under jit (`jax.jit(module.init)`): op by op, the VAE's init alone takes
# 15 s on a CPU.


def fit(loss: Callable[..., jax.Array], params: Any, data: dict[str, jax.Array], steps: int, s: Settings,
        name: str, batch: int | None = None) -> tuple[Any, dict[str, Any]]:
    """AdamW (warm-up, cosine decay, clipping at 1) on `loss(params, batch, key)` over batches drawn
    on device from `data`; returns the EMA of the params and the stage's log."""
    batch = batch or s.batch
    lr = optax.warmup_cosine_decay_schedule(0.0, s.lr, min(500, steps // 10 + 1), steps, s.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    rows = next(iter(jax.tree.leaves(data))).shape[0]
    grad = jax.value_and_grad(loss)

    def step(data, carry, key):
        p, o, ema = carry
        k_idx, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch,), 0, rows)
        value, g = grad(p, jax.tree.map(lambda x: x[idx], data), k_loss)
        updates, o = opt.update(g, o, p)
        p = optax.apply_updates(p, updates)
        ema = jax.tree.map(lambda e, x: s.ema * e + (1 - s.ema) * x, ema, p)
        return (p, o, ema), value

    # The data set is an argument (a constant would be copied into the program); the carry is donated.
    @functools.partial(jax.jit, donate_argnums=1)
    def many(data, carry, keys):
        return jax.lax.scan(functools.partial(step, data), carry, keys)

    carry = (params, opt.init(params), jax.tree.map(jnp.copy, params))
    key = jax.random.fold_in(jax.random.key(s.seed), zlib.crc32(name.encode()))
    log, start, done = [], time.perf_counter(), 0
    while done < steps:
        n = min(s.log_every, steps - done)
        key, sub = jax.random.split(key)
        carry, losses = many(data, carry, jax.random.split(sub, n))
        done += n
        log.append((done, float(losses.mean())))
        print(f"[{name}] step {done}/{steps} loss {log[-1][1]:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return carry[2], {"steps": steps, "batch": batch, "seconds": round(time.perf_counter() - start, 1),
                      "loss": log[-1][1], "log": log}


def train_vae(images: jax.Array, s: Settings) -> tuple[Any, Any, dict[str, Any]]:
    vae = vae_family.build(VAE)

    def loss(p, b, key):
        x = b["images"].astype(jnp.float32) / 127.5 - 1
        mean, logvar = vae.apply({"params": p}, x, method="encode")
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = vae.apply({"params": p}, z, method="decode")
        kl = 0.5 * (mean**2 + jnp.exp(logvar) - 1 - logvar)
        return jnp.mean((recon - x) ** 2) + 1e-4 * jnp.mean(kl)

    params = jax.jit(vae.init)(jax.random.key(s.seed), images[:1].astype(jnp.float32) / 127.5 - 1)["params"]
    params, log = fit(loss, params, {"images": images}, s.vae_steps, s, "vae", batch=s.vae_batch)
    return vae, params, log


def encode(vae: Any, params: Any, images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and standard deviations of all images (the VAE is frozen from here on)."""
    f = jax.jit(lambda x: vae.apply({"params": params}, x.astype(jnp.float32) / 127.5 - 1, method="encode"))
    means, stds = [], []
    for i in range(0, images.shape[0], 1024):
        m, lv = f(images[i:i + 1024])
        means.append(np.asarray(m))
        stds.append(np.asarray(jnp.exp(0.5 * lv)))
    return np.concatenate(means), np.concatenate(stds)


def encoders_of(spec: dict[str, Any]) -> text.PromptEncoders:
    """The text side of a spec's pipeline, as `conversion.load_encoders` would read it from the folder."""
    models = {c: clip_family.build(cfg) for c, (cfg, fam, _) in spec["components"].items() if fam is clip_family}
    tokenizers = {c: clip_tokenizer(pad_token=spec["tokenizers"][text.TOKENIZERS[c]]) for c in models}
    if spec["_class_name"] == "StableDiffusionPipeline":
        return text.PromptEncoders("sd", tokenizers, models, {c: 77 for c in models})
    return text.PromptEncoders("sd3", tokenizers, models, {c: 77 for c in models} | {"text_encoder_3": 256},
                               joint_attention_dim=MMDIT["joint_attention_dim"])


def _init_text(encoders: text.PromptEncoders, key: jax.Array) -> dict[str, Any]:
    ids = jnp.zeros((1, 77), jnp.int32)
    return {c: jax.jit(m.init)(jax.random.fold_in(key, i), ids)["params"]
            for i, (c, m) in enumerate(encoders.models.items())}


def _latents(b: dict[str, jax.Array], key: jax.Array, scale: float, shift: float) -> jax.Array:
    z = b["mean"] + b["std"] * jax.random.normal(key, b["mean"].shape)
    return (z - shift) * scale


def _drop_prompts(ids: dict[str, jax.Array], empty: dict[str, jax.Array], key: jax.Array, p: float = 0.1):
    keep = jax.random.uniform(key, (next(iter(ids.values())).shape[0], 1)) >= p
    return {c: jnp.where(keep, x, empty[c]) for c, x in ids.items()}


def train_sd2(spec: dict[str, Any], data: dict[str, Any], empty: dict[str, jax.Array], scale: float,
              s: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    encoders = encoders_of(spec)
    unet = unet_family.build(UNET)
    sched = schedules.ddpm_from_config(SD2_SCHEDULER)
    key = jax.random.key(s.seed + 1)
    params = _init_text(encoders, key)
    latent = IMAGE // 2
    params["unet"] = jax.jit(unet.init)(key, jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,)),
                                        jnp.zeros((1, 77, 64)))["params"]

    def loss(p, b, key):
        k_lat, k_drop, k_t, k_n = jax.random.split(key, 4)
        x0 = _latents(b, k_lat, scale, 0.0)
        ids = _drop_prompts(b["ids"], empty, k_drop)
        ctx = text.encode_prompts(encoders, p, ids)["prompt_embeds"]
        t = jax.random.randint(k_t, (x0.shape[0],), 0, 1000)
        noise = jax.random.normal(k_n, x0.shape)
        pred, _ = unet.apply({"params": p["unet"]}, schedules.add_noise(sched, x0, noise, t), t, ctx)
        return jnp.mean((pred - schedules.ddpm_target(sched, x0, noise, t, "v_prediction")) ** 2)

    return fit(loss, params, data, s.sd2_steps, s, "sd2")


def train_sd3(spec: dict[str, Any], data: dict[str, Any], empty: dict[str, jax.Array], scale: float, shift: float,
              s: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    encoders = encoders_of(spec)
    mmdit = mmdit_family.build(MMDIT)
    sched = schedules.flow_match_schedule(1000, SD3_SCHEDULER["shift"])
    key = jax.random.key(s.seed + 2)
    params = _init_text(encoders, key)
    latent = IMAGE // 2
    params["transformer"] = jax.jit(mmdit.init)(key, jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,)),
                                       jnp.zeros((1, 333, 64)), jnp.zeros((1, 64)))["params"]

    def loss(p, b, key):
        k_lat, k_drop, k_t, k_n = jax.random.split(key, 4)
        x0 = _latents(b, k_lat, scale, shift)
        ids = _drop_prompts(b["ids"], empty, k_drop)
        emb = text.encode_prompts(encoders, p, ids)
        t, sigma = schedules.sample_flow_timesteps(k_t, sched, x0.shape[0], 0.0, 1.0)
        noise = jax.random.normal(k_n, x0.shape)
        pred, _ = mmdit.apply({"params": p["transformer"]}, schedules.flow_noisy_input(x0, noise, sigma), t,
                              emb["prompt_embeds"], emb["pooled_prompt_embeds"])
        return jnp.mean((pred - schedules.flow_target(x0, noise)) ** 2)

    return fit(loss, params, data, s.sd3_steps, s, "sd3")


def zero_unused_rows(params: dict[str, Any], used: np.ndarray) -> dict[str, Any]:
    """Token-embedding rows of tokens the world never uses set to zero (module docstring)."""
    def visit(path, x):
        if jax.tree_util.keystr(path).endswith("['token_embedding']['embedding']"):
            keep = np.zeros((x.shape[0], 1), np.float32)
            keep[used] = 1.0
            return x * keep
        return x

    return jax.tree_util.tree_map_with_path(visit, params)


def evaluate(folder: Path, s: Settings) -> dict[str, Any]:
    """The evaluator's accuracies on the validation prompt sets, sampled from `folder` as written."""
    from ctcal_jax import sampling

    pipe = sampling.load_pipeline(str(folder))
    out: dict[str, Any] = {}
    for category in shapes.CATEGORIES:
        scenes = shapes.prompt_set(category, split="validation", n=s.eval_n, seed=s.seed)
        images = sampling.generate(pipe, [sc.prompt for sc in scenes], num_inference_steps=s.eval_steps,
                                   guidance_scale=s.guidance, seed=s.seed, height=IMAGE, width=IMAGE)["images"]
        out[category] = shapes_eval.score((np.asarray(images) * 255).round().astype(np.uint8), scenes)
        print(f"[eval {folder.name}] {category}: {out[category]}", flush=True)
    return out


def vocabulary_ids(prompts: Sequence[str]) -> np.ndarray:
    """Every token id the world's prompts (and the special tokens) use."""
    tokenizer = clip_tokenizer()
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("!")}
    for row in tokenizer(sorted(set(prompts)))["input_ids"]:
        ids.update(row)
    return np.asarray(sorted(ids))


def run(out: Path, s: Settings, stages: Sequence[str] = ("sd2", "sd3")) -> dict[str, Any]:
    """Every stage (module docstring); writes the folders and `report.json` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": dataclasses.asdict(s), "device": str(jax.devices()[0].device_kind)}
    t0 = time.perf_counter()
    images, prompts = world(s.rows, s.seed)
    report["world_seconds"] = round(time.perf_counter() - t0, 1)
    vae, vae_params, report["vae"] = train_vae(jnp.asarray(images), s)
    mean, std = encode(vae, vae_params, jnp.asarray(images))
    scale, shift = float(1 / mean.std()), float(mean.mean())
    report["vae"].update(scaling_factor=scale, shift_factor=shift)
    folders = specs({**VAE, "scaling_factor": scale},
                    {**VAE, "scaling_factor": float(1 / (mean - shift).std()), "shift_factor": shift})
    eval_prompts = [sc.prompt for c in shapes.CATEGORIES for split in ("validation", "test")
                    for sc in shapes.prompt_set(c, split=split, n=s.eval_n, seed=s.seed)]
    used = vocabulary_ids(prompts + eval_prompts)
    for name in stages:
        spec = folders[f"shapes-{name}"]
        encoders = encoders_of(spec)
        ids = {c: jnp.asarray(text.tokenize(tok, prompts, 77)["input_ids"]) for c, tok in encoders.tokenizers.items()}
        empty = {c: jnp.asarray(text.tokenize(tok, [""], 77)["input_ids"]) for c, tok in encoders.tokenizers.items()}
        data = {"mean": jnp.asarray(mean), "std": jnp.asarray(std), "ids": ids}
        if name == "sd2":
            params, report["sd2"] = train_sd2(spec, data, empty, scale, s)
        else:
            sd3_scale = spec["components"]["vae"][0]["scaling_factor"]
            params, report["sd3"] = train_sd3(spec, data, empty, sd3_scale, shift, s)
        params = zero_unused_rows(params, used) | {"vae": vae_params}
        folder = out / f"shapes-{name}"
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tiny.write_folder(folder, spec, jax.tree.map(np.asarray, params), dtype=np.float16)
        report[name]["eval"] = evaluate(folder, s)
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        (out / "report.json").write_text(json.dumps(report, indent=1))  # after each stage: a stopped run keeps it
    return report


def main(argv: Sequence[str] | None = None) -> None:
    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m ctcal_jax.pretrain_shapes", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for shapes-sd2/, shapes-sd3/, report.json")
    ap.add_argument("--stages", default="sd2,sd3", help="which denoisers to train (the VAE always is)")
    for f in dataclasses.fields(Settings):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(d, f.name)), default=getattr(d, f.name))
    args = ap.parse_args(argv)
    s = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    stages = [x for x in args.stages.split(",") if x]
    if not set(stages) <= {"sd2", "sd3"}:
        ap.error(f"--stages={args.stages!r}: expected sd2, sd3 or both")
    report = run(args.out, s, stages)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, default=str)[:2000])


if __name__ == "__main__":
    main()
