r"""The embedded default: CTCAL LoRA on the built-in tiny SD 2.x pipeline, offline, on a CPU.

    python -m ctcal_jax.train --config configs/demo.py --workdir out/demo      # what `make demo` runs

Trains LoRA adapters (UNet attention, CLIP self-attention) and the map autoencoder for 60 steps on
eight prompts with their nouns and smooth random latents (`data.kind="synthetic"`), about two
minutes on 2 cores. The model is `builtin:tiny-sd2`: a complete diffusers folder with seeded random
weights (nothing can be downloaded here), written on first use under ~/.cache/ctcal_jax. It leaves
in out/demo: metrics.jsonl (loss falling from ~1.1), checkpoints/, lora/pytorch_lora_weights.safetensors
(loads with diffusers' `load_lora_weights` onto that folder) and figures/attention_*.png (each noun's
16×16 map, student at t=800 beside the teacher at t=0). Random weights show the machinery, not a
trained model's layout; the shapes world of the roadmap replaces them.
"""

from ctcal_jax.config import base_config
from ctcal_jax.data.synthetic import DEMO_PROMPTS


def get_config(runlocal: str = ""):
    """`runlocal` (`--config configs/demo.py:runlocal`): 6 steps, for smoke tests."""
    c = base_config()
    c.model.pretrained = "builtin:tiny-sd2"
    c.data.kind = "synthetic"
    c.data.prompts = DEMO_PROMPTS
    c.data.resolution = 256  # 32×32 latents: 16×16 maps at the UNet's second level
    c.data.max_nouns = 4
    # SPEC §3's learning rates ×20: a 60-step demo, not a 50 000-step run.
    c.optim.groups = ((r"^(unet|ae)/", 1e-3, 0.01), (r"^text_encoder", 1e-4, 0.01))
    c.batch_size = 8
    c.total_steps = 60
    c.log_every = 5
    c.checkpoint_every = 20
    c.sample_every = 30
    if runlocal:
        c.total_steps, c.log_every, c.checkpoint_every, c.sample_every = 6, 1, 3, 6
    return c
