r"""TACA LoRA on Stable Diffusion 3.5 medium: the flow-matching loss with TACA active (SPEC §4).

    python -m ctcal_jax.prepare --pretrained stabilityai/stable-diffusion-3.5-medium \
        --data DATA --out DATA/sd35-1024 --resolution 1024
    python -m ctcal_jax.train --config configs/sd35_taca.py --workdir runs/sd35_taca \
        --config.data.path=DATA/sd35-1024

Image-query × text-key logits scaled by γ0 = 1.2 in every joint attention; timesteps drawn from the
schedule points t ≥ 970 (the official code's first 3 of 30 steps), the only steps where TACA acts at
sampling, so the LoRA (rank 16, the paper's smaller setting; `--config.lora.rank=64` for the other)
learns to correct what the temperature changes there. Only the MM-DiT is adapted. AdamW 1e-4 (our
choice: the paper does not give it), weight decay 1e-4, global batch 64, 5 000 steps. Writes the
metrics (loss = diffusion), checkpoints and `lora/`; no attention figures (no CTCAL maps). At
sampling, pass the LoRA with `taca=` so it is active exactly while TACA is.

Sampling with TACA and the trained LoRA (28 flow-matching steps, CFG 7.0, as diffusers' SD3 pipeline):

    python -m ctcal_jax.sample --config configs/sd35_taca.py --taca \
        --config.sample.lora=runs/sd35_taca/lora --prompts PROMPTS.txt --out out/sd35_taca

Variant: `runlocal` (the built-in tiny SD3 pipeline on a CPU).
"""

from ctcal_jax import config


def get_config(arg: str = ""):
    names = config.variants(arg)
    c = config.sd3_defaults(config.base_config())
    c.model.pretrained = "stabilityai/stable-diffusion-3.5-medium"
    c.model.dtype, c.model.compute_dtype = "bfloat16", "float32"
    c.model.remat = "dots"
    c.objective = "taca"
    c.lora.rank, c.lora.alpha, c.lora.text_targets = 16, 16.0, ""
    c.optim.groups = ((r"^transformer/", 1e-4, 1e-4),)
    c.optim.accum_steps = 1
    c.total_steps = 5000
    c.sample_every = 0
    c.data.kind = "records"
    if "runlocal" in names:
        config.runlocal(c, "tiny-sd3")
        c.model.remat, c.sample_every = "none", 0
    return c
