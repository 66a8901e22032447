r"""CTCAL LoRA fine-tuning of Stable Diffusion 3 medium (SPEC §3's SD3 setting).

    python -m ctcal_jax.prepare --pretrained stabilityai/stable-diffusion-3-medium-diffusers \
        --data DATA --out DATA/sd3-1024 --resolution 1024
    python -m ctcal_jax.train --config configs/sd3_ctcal.py --workdir runs/sd3_ctcal \
        --config.data.path=DATA/sd3-1024

1024 px: 64×64 maps of every joint block, both text streams (CLIP tokens and T5 tokens, each with
its own noun groups, averaged), 5×5 smoothing; λ = (0.01, 1, 0.01, 0); the teacher at the fixed
timestep argmax_k p_k/t_k of the logit-normal sampler with shift 3 (570.6, logged at start). LoRA
rank 4 on the MM-DiT attention and both CLIP encoders' self-attention (T5 frozen; its stream comes
precomputed from `prepare`); AdamW 5e-5 / 1e-5, weight decay 1e-4 / 1e-3; global batch 64 with 4
accumulation steps (16 per step), 20 000 steps; bf16 weights, fp32 LoRA, `remat="dots"` so a
24-block step at 1024 px fits an 80 GB GPU (docs/benchmarks.md). Writes what sd21_ctcal.py writes.

Variants: the ablations of sd21_ctcal.py and `runlocal` (the built-in tiny SD3 pipeline on a CPU).
"""

from ctcal_jax import config


def get_config(arg: str = ""):
    names = config.variants(arg)
    c = config.sd3_defaults(config.base_config())
    c.model.pretrained = "stabilityai/stable-diffusion-3-medium-diffusers"
    c.model.dtype, c.model.compute_dtype = "bfloat16", "float32"
    c.model.remat = "dots"
    c.data.kind = "records"
    config.apply_ablations(c, names)
    if "runlocal" in names:
        config.runlocal(c, "tiny-sd3")
        c.model.remat = "none"
    return c
