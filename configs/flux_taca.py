r"""TACA LoRA on FLUX.1-dev, the TACA paper's main model: the flow-matching loss with TACA active (SPEC §4).

    python -m ctcal_jax.prepare --pretrained black-forest-labs/FLUX.1-dev \
        --data DATA --out DATA/flux-1024 --resolution 1024
    python -m ctcal_jax.train --config configs/flux_taca.py --workdir runs/flux_taca \
        --config.data.path=DATA/flux-1024

Image-query × text-key logits scaled by γ0 = 1.2 in every joint attention (19 double-stream and 38
single-stream blocks); timesteps drawn uniformly from FLUX's training sigmas with t ≥ 970 (the
unshifted schedule, as diffusers' FLUX script trains; at 1024² sampling with its dynamic shift these
are the first 3 of 28 steps, where TACA acts). LoRA rank 64 (the paper's FLUX.1-dev setting;
`--config.lora.rank=16` for the other) on the attention projections of every block (`to_q/to_k/to_v`,
and `to_out.0` of the double blocks); the text encoders stay frozen (T5's stream comes precomputed
from `prepare`). Embedded guidance 3.5 during training. AdamW 1e-4, weight decay 1e-4 (our choice: the
paper does not give them); global batch 16 = 2 accumulation steps × 8 devices × 1, 5 000 steps.

Memory: bf16 weights and compute, fp32 LoRA and AdamW moments, `remat="dots"`, the frozen kernels
sharded over all devices (`mesh.fsdp=-1`: 23 GB of bf16 weights become 3 GB per device on 8 GPUs).
`python -m ctcal_jax.compile_check --config configs/flux_taca.py --devices 8` compiles the step
without the weights (docs/benchmarks.md has its memory analysis on 1 and 8 devices).

Writes the metrics (loss = diffusion), checkpoints and `lora/` (loads in diffusers' `FluxPipeline`
with `load_lora_weights`); no attention figures (no CTCAL maps). At sampling, pass the LoRA with
`taca=` so it is active exactly while TACA is:

    python -m ctcal_jax.sample --config configs/flux_taca.py --taca \
        --config.sample.lora=runs/flux_taca/lora --prompts PROMPTS.txt --out out/flux_taca

Variant: `runlocal` (the built-in tiny FLUX.1-dev pipeline on a CPU).
"""

from ctcal_jax import config


def get_config(arg: str = ""):
    names = config.variants(arg)
    c = config.base_config()
    c.model.pretrained = "black-forest-labs/FLUX.1-dev"
    c.model.dtype, c.model.compute_dtype = "bfloat16", "bfloat16"
    c.model.remat = "dots"
    c.objective = "taca"
    c.lora.rank, c.lora.alpha, c.lora.text_targets = 64, 64.0, ""
    c.optim.groups = ((r"^transformer/", 1e-4, 1e-4),)
    c.optim.accum_steps = 2
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.batch_size = 16
    c.total_steps = 5000
    c.sample_every = 0
    c.data.kind = "records"
    c.data.resolution, c.data.latent_channels = 1024, 16
    if "runlocal" in names:
        config.runlocal(c, "tiny-flux")
        c.model.remat, c.lora.rank, c.lora.alpha, c.sample_every = "none", 4, 4.0, 0
    return c
