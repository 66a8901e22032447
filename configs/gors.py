r"""GORS baseline on Stable Diffusion 2.1: LoRA fine-tuning with the reward-weighted diffusion loss.

GORS (T2I-CompBench) fine-tunes on the model's own samples, each weighted by its compositional
reward: `L = mean_b reward_b · L_diffusion` (SPEC §3's w_gors), with no attention term. The data is an
image folder whose `metadata.jsonl` rows carry `reward` (prepared to records, which keep it):

    python -m ctcal_jax.prepare --pretrained stabilityai/stable-diffusion-2-1 --data GORS_DATA \
        --out GORS_DATA/sd21-512 --resolution 512
    python -m ctcal_jax.train --config configs/gors.py --workdir runs/gors \
        --config.data.path=GORS_DATA/sd21-512

The CTCAL run's LoRA targets, ranks, learning rates and steps, so the two are compared like for
like. Writes the metrics (loss = the reward-weighted diffusion loss), checkpoints and `lora/`.

Variant: `runlocal` (the built-in tiny pipeline, synthetic data without rewards, 4 steps).
"""

from ctcal_jax import config


def get_config(arg: str = ""):
    names = config.variants(arg)
    c = config.base_config()
    c.model.pretrained = "stabilityai/stable-diffusion-2-1"
    c.model.dtype, c.model.compute_dtype = "bfloat16", "float32"
    c.objective = "diffusion"
    c.optim.groups = ((r"^unet/", 5e-5, 0.01), (r"^text_encoder", 5e-6, 0.01))
    c.sample_every = 0
    c.data.kind = "records"
    c.data.resolution = 512
    if "runlocal" in names:
        config.runlocal(c, "tiny-sd2")
        c.sample_every = 0
    return c
