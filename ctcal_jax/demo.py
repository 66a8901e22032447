"""`make demo`: what exists of the main job, run end to end offline on a CPU in seconds.

It writes a small SD-style UNet as a diffusers folder (`config.json` + safetensors, no torch),
loads it back with `conversion.load_component`, noises a latent with the DDPM schedule, runs the
jitted forward with the 16×16 cross-attention maps captured, and writes the per-token maps as a PNG.
The weights are random (nothing can be downloaded here), so the maps show the machinery, not a
trained model's layout. Once the trainer lands, `make demo` runs `python -m ctcal_jax.train
--config configs/demo.py` instead.

    python -m ctcal_jax.demo --out out/demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from conversion import files, load_component, names
from conversion.unet import abstract_params, build
from ctcal_jax import schedules
from ctcal_jax.attention import AttnCapture

# A 4-block SD 2.x-style UNet (linear projections, per-block heads), 2% of SD 2.1's width.
DEMO_UNET = {
    "_class_name": "UNet2DConditionModel",
    "in_channels": 4, "out_channels": 4, "sample_size": 64,
    "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": [2, 4, 4, 4], "cross_attention_dim": 64, "use_linear_projection": True,
}


def write_random_unet(folder: Path, seed: int = 0) -> None:
    """A diffusers-format UNet folder with seeded random weights, written without torch."""
    module = build(DEMO_UNET)
    shapes = abstract_params(module, DEMO_UNET)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(DEMO_UNET, indent=2))
    files.write_safetensors(folder / "diffusion_pytorch_model.safetensors", names.flax_to_torch(params))


def maps_png(maps: np.ndarray, file: Path, scale: int = 8) -> None:
    """Tile `[h, w, T]` maps side by side, each min-max normalised, as a grey-scale PNG."""
    lo, hi = maps.min(axis=(0, 1)), maps.max(axis=(0, 1))
    tiles = (maps - lo) / np.maximum(hi - lo, 1e-12)
    row = np.concatenate([np.pad(tiles[..., i], 1) for i in range(maps.shape[-1])], axis=1)
    img = Image.fromarray((row * 255).astype(np.uint8)).resize((row.shape[1] * scale, row.shape[0] * scale),
                                                               Image.NEAREST)
    img.save(file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--tokens", type=int, default=8, help="text tokens of the synthetic prompt")
    parser.add_argument("--timestep", type=int, default=500)
    args = parser.parse_args(argv)

    unet_dir = args.out / "unet"
    write_random_unet(unet_dir)
    model, params = load_component(unet_dir, "unet")
    print(f"loaded {unet_dir}: {sum(p.size for p in jax.tree.leaves(params)):,} parameters")

    rng = jax.random.split(jax.random.key(1), 3)
    x0 = jax.random.normal(rng[0], (1, 64, 64, 4))
    noise = jax.random.normal(rng[1], x0.shape)
    context = jax.random.normal(rng[2], (1, args.tokens, DEMO_UNET["cross_attention_dim"]))
    t = jnp.array([args.timestep])
    x_t = schedules.add_noise(schedules.ddpm_schedule(), x0, noise, t)

    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c, capture=AttnCapture(resolutions=(16,))))
    pred, aux = forward(params, x_t, t, context)
    maps = np.asarray(aux["attn"][0])
    mse = float(jnp.mean((pred - noise) ** 2))
    maps_png(maps, args.out / "maps.png")
    summary = {"timestep": args.timestep, "eps_mse": mse, "maps_shape": list(aux["attn"].shape),
               "maps_row_sum": float(maps.sum(-1).mean())}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    print(f"wrote {args.out / 'maps.png'} (one 16×16 map per text token)")


if __name__ == "__main__":
    main()
