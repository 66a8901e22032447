"""The GPU presets of `benchmarks/ctcal_step.py` at full size on a CPU: the whole SD 2.1 and
SD3-medium CTCAL steps trace with abstract weights (no weights, no compilation), the Flax models have
exactly the PyTorch models' parameter counts, and the step's model FLOPs are counted. Slow: about a
minute each. Also the compile path (`--dry-run --compile`) on the small SD3 preset, per remat policy."""

import math

import pytest
import torch


def _torch_param_count(cls: str, config: dict) -> int:
    """Parameters of the PyTorch model built on the meta device (shapes only, no memory)."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if cls.startswith("CLIP"):
            model = getattr(transformers, cls)(transformers.CLIPTextConfig(**config))
        else:
            model = getattr(diffusers, cls)(**config)
    return sum(math.prod(p.shape) for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd21-512", "sd3m-1024"])
def test_gpu_preset_step_traces_at_full_size(name):
    from benchmarks import ctcal_step  # imported here: the script sets its environment defaults on import

    preset = ctcal_step.PRESETS[name]
    result = ctcal_step.dry_run(preset)
    for component, (cls, _, config) in ctcal_step.components(preset).items():
        assert result["frozen_params"][component] == _torch_param_count(cls, config), component
    assert all(count > 0 for count in result["trainable_params"].values())
    assert {"loss", "diffusion", "grad_norm"} <= set(result["metrics"])
    assert all(spec == "float32[]" for spec in result["metrics"].values())
    # Per sample: a student forward and backward plus a teacher forward, each ~9 TFLOP (SD3-medium,
    # 4429 tokens) or ~0.8 TFLOP (SD 2.1 UNet, 64×64 latents): the count must be of that order.
    per_sample = result["flops_per_step"] / preset["batch"]
    assert {"sd21-512": 1e12, "sd3m-1024": 1.5e13}[name] < per_sample < {"sd21-512": 5e12, "sd3m-1024": 6e13}[name]


@pytest.mark.slow
def test_compile_per_remat_policy():
    """`--dry-run --compile` on the small SD3 preset: each policy lowers and compiles; "full" keeps fewer
    activations for the backward pass and the compiled step recomputes them (more FLOPs)."""
    from benchmarks import ctcal_step

    rows = {r["remat"]: r for r in ctcal_step.compile_policies(ctcal_step.PRESETS["cpu-small-sd3"], ["none", "full"])}
    assert rows["full"]["kept_for_backward_bytes"] < rows["none"]["kept_for_backward_bytes"] / 2
    assert rows["full"]["compiled_flops"] > rows["none"]["compiled_flops"]
    assert all(r["temp_bytes"] > 0 and r["argument_bytes"] > 0 and r["compile_s"] > 0 for r in rows.values())
