"""Helpers shared by the benchmark scripts: model configs, PyTorch device handling, weight transfer
from a PyTorch model to ctcal_jax, the explicit-softmax map processor, timing and the device report.

Nothing here measures by itself; `attention.py`, `ctcal_step.py`, `sampling.py` and `iterref.py` do.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from conversion import known

# The SD 2.1 UNet (diffusers `stabilityai/stable-diffusion-2-1[-base]/unet/config.json`, at 512 px).
SD21_UNET = {**{k: v for k, v in known.SD21_UNET.items() if k != "_class_name"}, "sample_size": 64}
# The SD3-medium MM-DiT (`stabilityai/stable-diffusion-3-medium-diffusers/transformer/config.json`).
SD3_MEDIUM = {k: v for k, v in known.SD3_MEDIUM.items() if k != "_class_name"}


# ---------------------------------------------------------------------------------------- PyTorch side


class UNetMapsProcessor:
    """Attention with the softmax formed explicitly (Attend-and-Excite): head-mean maps `[B, L, T]`
    appended to `store` (with their autograd graph when gradients are on); `store=None` records
    nothing (A&E's processor on the layers whose maps nobody reads)."""

    def __init__(self, store: list | None):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        import torch

        b, length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # [B·N, L, T]
        if self.store is not None:
            self.store.append(probs.reshape(b, attn.heads, length, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def captured_unet_layers(processor_names, config: dict[str, Any], latent: int, resolution: int) -> list[str]:
    """The `attn2` processors of a diffusers UNet whose maps are `resolution`² for a `latent`² input:
    the cross-attention layers ctcal_jax's `AttnCapture(resolutions=(resolution,))` captures."""
    level = int(np.log2(latent // resolution))  # down level whose maps have the capture size
    n_up = len(config["block_out_channels"]) - 1 - level
    return [n for n in processor_names if n.endswith("attn2.processor")
            and (n.startswith(f"down_blocks.{level}.") or n.startswith(f"up_blocks.{n_up}."))]


def to_torch_device(model, dtype):
    model = model.to(torch_device())
    return model if dtype == next(model.parameters()).dtype else model.to(dtype)


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def unit_scale_init(model, seed: int):
    """Random weights at a trained model's scale (as `tests/step_setup.random_params`): fan-in-scaled
    kernels, norm scales near 1, small biases, unit embeddings. Attention maps then have structure,
    so the checks exercise every term; the timing does not depend on it."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def normal(p):
        return torch.randn(p.shape, generator=gen, dtype=p.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.copy_(normal(m.weight) / math.sqrt(m.weight[0].numel()))
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1.0 + 0.1 * normal(m.weight))
            elif isinstance(m, torch.nn.Embedding):
                m.weight.copy_(normal(m.weight))
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.copy_(0.1 * normal(m.bias))
    return model


def class_name(config: dict[str, Any]) -> str:
    """The diffusers (`_class_name`) or transformers (`architectures[0]`) class of a config.json dict."""
    return config.get("_class_name") or config["architectures"][0]


def torch_model(config: dict[str, Any], seed: int = 0, meta: bool = False):
    """The diffusers/transformers model of a config.json dict (its class named in it), fp32 on the
    CPU with `unit_scale_init` weights; `meta=True` builds it on the meta device (shapes only)."""
    import diffusers
    import torch
    import transformers

    cls = class_name(config)
    kwargs = {k: v for k, v in config.items() if k not in ("_class_name", "architectures")}
    with torch.device("meta" if meta else "cpu"):
        if cls.startswith("CLIP"):
            model = getattr(transformers, cls)(transformers.CLIPTextConfig(**kwargs))
        else:
            model = getattr(diffusers, cls)(**kwargs)
    return model.eval() if meta else unit_scale_init(model.eval(), seed)


def abstract_model(config: dict[str, Any], dtype: Any) -> tuple[Any, Any]:
    """The Flax module of a config.json dict and its params as `jax.ShapeDtypeStruct`s in `dtype`
    (nothing allocated): the conversion family `conversion.load` picks for the class."""
    from conversion.load import family

    fam = family(class_name(config), "benchmark config")
    module = fam.build(config, dtype=dtype)
    shapes = fam.abstract_params(module, config)
    return module, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)


def count_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------- helpers


def model_config(torch_model) -> dict[str, Any]:
    """A diffusers or transformers model's config as a plain dict (tuples as lists, as in config.json)."""
    config = torch_model.config
    if hasattr(config, "to_dict"):  # transformers: the class name goes in `architectures`
        config = config.to_dict()
        config["architectures"] = config.get("architectures") or [type(torch_model).__name__]
    else:  # diffusers: a FrozenDict; the family module is chosen by the caller
        config = dict(config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def jax_params(torch_model, family: str, dtype) -> tuple[Any, Any]:
    """The Flax module and params holding the PyTorch model's weights (in memory, no files): the
    conversion `load_component` applies to a saved folder (`conversion.<family>`)."""
    from conversion import names

    fam = importlib.import_module(f"conversion.{family}")
    config = model_config(torch_model)
    module = fam.build(config, dtype=dtype)
    state = {k: v.detach().float().cpu().numpy() for k, v in torch_model.state_dict().items()}
    params = names.torch_to_flax(state, fam.abstract_params(module, config), source=f"benchmark {family}",
                                 rename=getattr(fam, "rename", None))
    return module, jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def time_round_robin(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn; warm-up calls (jit compilation) are not timed. The fns
    take turns, so a change of load on a shared machine hits all of them alike."""
    return {k: statistics.median(v) for k, v in time_round_robin_all(fns, runs, warmup).items()}


def time_round_robin_all(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 2) -> dict[str, list[float]]:
    """Every timed call's seconds, per fn (see `time_round_robin`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def write_json(path: Path | None, results: dict[str, Any]) -> dict[str, Any]:
    """`results` to `path` (when given); returns them."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
    return results


def run_record(runs: int) -> dict[str, Any]:
    """What every benchmark's JSON records about the run: the device (and the OpenMP wait policy the
    scripts set), the command line, the timed repetitions."""
    return {"device": {**describe_device(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "runs": runs}


def describe_device() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    d = jax.devices()[0]
    return {
        "jax": f"{d.platform}: {getattr(d, 'device_kind', d)} ×{jax.device_count()}",
        "torch": (torch.cuda.get_device_name() if torch.cuda.is_available()
                  else f"cpu ({torch.get_num_threads()} threads)"),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "versions": f"jax {jax.__version__}, torch {torch.__version__}",
        # Other work on the machine skews absolute times (and, less, the ratios): say how busy it was.
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# Peak dense bf16 FLOP/s per device (no sparsity), by `device_kind` substring; first match wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
]


def peak_flops(override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of JAX's first device: `override_tflops`, else `PEAK_BF16_FLOPS`;
    None on a CPU or an accelerator the table does not know (no MFU then)."""
    if override_tflops:
        return override_tflops * 1e12
    if jax.default_backend() == "cpu":
        return None
    kind = jax.devices()[0].device_kind.lower()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key.lower() in kind), None)
