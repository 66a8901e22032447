r"""The embedded default: CTCAL LoRA fine-tuning of the shipped shapes-world UNet, offline, on a CPU.

    python -m ctcal_jax.train --config configs/demo.py --workdir out/demo      # what `make demo` runs

The model is `builtin:shapes-sd2` (`ctcal_jax/assets/shapes-sd2`: an SD 2.x-layout UNet, a CLIP text
encoder with the real CLIP tokenizer and a small VAE, pretrained on the shapes world by
`python -m ctcal_jax.pretrain_shapes`); the data is the shapes world itself (`data.kind="shapes"`:
1–3 coloured circles, squares and triangles with prompts such as "a red circle to the left of a blue
square", nouns from the grammar, no tagger). It trains LoRA adapters (UNet attention, CLIP
self-attention) and the map autoencoder with the CTCAL objective for 300 steps of 16 images, and
measures the exact evaluator (`ctcal_jax.data.shapes`) on 16 validation prompts per category before
the first step and after the last. It leaves in out/demo:

    metrics.jsonl              loss and CTCAL terms every 10 steps
    eval.jsonl                 the evaluator's accuracies per category, step 0 (base) and step 300
    figures/eval_*.png         one sample per category with each noun's attention overlaid
    figures/attention_*.png    each noun's 16×16 map, student at t=800 beside the teacher
    lora/pytorch_lora_weights.safetensors   loads with diffusers' `load_lora_weights` onto the folder
    checkpoints/               the same command again resumes (or, finished, does nothing)
"""

from ctcal_jax.config import base_config


def get_config(runlocal: str = ""):
    """`runlocal` (`--config configs/demo.py:runlocal`): 6 steps and 2 prompts per category, for smoke tests."""
    c = base_config()
    c.model.pretrained = "builtin:shapes-sd2"
    c.data.kind = "shapes"
    c.data.resolution = 32  # 16×16 latents: the UNet's first level captures 16×16 maps
    c.data.max_nouns = 4
    c.ctcal.map_resolution = 16
    # SPEC §3's learning rates ×20: a 300-step demo, not a 50 000-step run.
    c.optim.groups = ((r"^(unet|ae)/", 1e-3, 0.01), (r"^text_encoder", 1e-4, 0.01))
    c.batch_size = 16
    c.total_steps = 300
    c.log_every = 10
    c.checkpoint_every = 100
    c.sample_every = 100
    c.eval.every = 300
    c.eval.n = 16
    if runlocal:
        c.total_steps, c.log_every, c.checkpoint_every, c.sample_every = 6, 1, 3, 6
        c.eval.every, c.eval.n, c.eval.num_inference_steps = 6, 2, 4
        c.batch_size = 8  # divisible by the 8 fake devices of the sharding tests
    return c
