r"""CTCAL LoRA fine-tuning of Stable Diffusion 2.1 (SPEC §3 defaults; the paper's SD 2.1 setting).

Data: captioned images as an image folder (`metadata.jsonl` with `file_name`, `text`), prepared once
into VAE latents, token ids and Stanza noun groups (docs/data.md):

    python -m ctcal_jax.prepare --pretrained stabilityai/stable-diffusion-2-1 --data DATA \
        --out DATA/sd21-512 --resolution 512
    python -m ctcal_jax.train --config configs/sd21_ctcal.py --workdir runs/sd21_ctcal \
        --config.data.path=DATA/sd21-512

512 px (64×64 latents: the UNet's third level holds the 16×16 maps CTCAL aligns), LoRA rank 4 on
the UNet attention and the CLIP self-attention, the map autoencoder, AdamW 5e-5 / 5e-6, weight decay
0.01, global batch 64, 50 000 steps; bf16 weights computed in fp32 with fp32 LoRA factors. It writes
the metrics (loss, diffusion, ctcal and its four terms, grad_norm, samples/s), checkpoints every
1000 steps, the LoRA in diffusers format (`lora/`) and, every 1000 steps, each noun's map at t=800
beside the teacher's at t=0. On 8×H100 expect the CTCAL terms to fall within the first thousand
steps while the diffusion loss stays flat.

Variants, `--config configs/sd21_ctcal.py:NAME[,NAME]`: the ablations of Table 4 (`all_tokens`,
`pixel_only`, `no_regularizer`, `no_adaptive`) and Table 6 (`adjectives`: prepare the data with
`--include-adjectives` too), and `runlocal` (the built-in tiny pipeline, synthetic data, 4 steps on
a CPU).
"""

from ctcal_jax import config


def get_config(arg: str = ""):
    names = config.variants(arg)
    c = config.base_config()
    c.model.pretrained = "stabilityai/stable-diffusion-2-1"
    c.model.dtype, c.model.compute_dtype = "bfloat16", "float32"
    c.data.kind = "records"
    c.data.resolution = 512
    config.apply_ablations(c, names)
    return config.runlocal(c, "tiny-sd2") if "runlocal" in names else c
