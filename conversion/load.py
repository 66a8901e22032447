"""`load_component`: a diffusers/transformers folder -> (Flax module, params), without torch.

Each model family is a module of this package exposing
- `build(config: dict, dtype) -> flax.linen.Module`  (raises ValueError on unsupported config values)
- `abstract_params(module, config) -> pytree of jax.ShapeDtypeStruct`
- optionally `rename(torch_key) -> path tuple | None` for keys the generic rule (names.py) misses.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from conversion import files, names

# diffusers / transformers class name -> family module.
FAMILIES = {
    "UNet2DConditionModel": "conversion.unet",
    "SD3Transformer2DModel": "conversion.mmdit",
    "FluxTransformer2DModel": "conversion.flux",
    "AutoencoderKL": "conversion.vae",
    "CLIPTextModel": "conversion.clip",
    "CLIPTextModelWithProjection": "conversion.clip",
    "T5EncoderModel": "conversion.t5",
}

# Which classes each pipeline component may hold.
COMPONENT_CLASSES = {
    "unet": {"UNet2DConditionModel"},
    "transformer": {"SD3Transformer2DModel", "FluxTransformer2DModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel", "CLIPTextModelWithProjection"},
    "text_encoder_2": {"CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"},
    "text_encoder_3": {"T5EncoderModel"},
}


def family(cls: str, config_file: Path | str):
    """The conversion module for a diffusers/transformers class name."""
    if cls not in FAMILIES:
        raise ValueError(f"{config_file}: unknown model class {cls!r}; supported: {sorted(FAMILIES)}")
    try:
        return importlib.import_module(FAMILIES[cls])
    except ModuleNotFoundError as e:
        if e.name == FAMILIES[cls]:
            raise ValueError(f"{config_file}: model class {cls!r} is not supported yet") from None
        raise


def load_component(
    path: str | Path,
    component: str,
    dtype: Any = jnp.float32,
    *,
    compute_dtype: Any = None,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load one component of a diffusers pipeline (or a component folder) as Flax module + params.

    Args:
      path: a pipeline folder (with `model_index.json`) or a single component folder.
      component: `unet | transformer | vae | text_encoder | text_encoder_2 | text_encoder_3`.
      dtype: dtype of the returned parameters (and the compute dtype unless `compute_dtype`).
      compute_dtype: dtype the module computes in, e.g. bf16 over fp32 params.
      variant: weights variant such as `"fp16"` (`diffusion_pytorch_model.fp16.safetensors`).
      allow_pickle: accept `.bin/.ckpt/.pt` weights, read with `torch.load(weights_only=True)`.
    """
    if component not in COMPONENT_CLASSES:
        raise ValueError(f"unknown component {component!r}; expected one of {list(COMPONENT_CLASSES)}")
    folder = files.component_dir(path, component)
    config_file = folder / "config.json"
    config = files.read_json(config_file)
    cls = files.class_name(config, config_file)
    if cls not in COMPONENT_CLASSES[component]:
        raise ValueError(
            f"{config_file}: class {cls!r} cannot be the {component!r} component "
            f"(expected one of {sorted(COMPONENT_CLASSES[component])})"
        )
    fam = family(cls, config_file)
    module = fam.build(config, dtype=compute_dtype or dtype)
    state = files.read_state_dict(folder, variant=variant, allow_pickle=allow_pickle)
    params = names.torch_to_flax(
        state, fam.abstract_params(module, config), source=str(folder), rename=getattr(fam, "rename", None)
    )
    return module, jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)


def config_value(config: dict[str, Any], key: str, allowed: Any, config_file: str = "config.json") -> Any:
    """`config[key]`, checked against the values this implementation supports."""
    value = config.get(key)
    if value not in allowed:
        raise ValueError(f"{config_file}: {key}={value!r} is not supported (supported: {allowed})")
    return value
