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
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, Sharding

from conversion import files, names
from ctcal_jax import sharding

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


def build(fam: Any, config: dict[str, Any], config_file: Path | str, dtype: Any) -> nn.Module:
    """`fam.build(config, dtype)`, its errors naming the full path of `config_file`: the families
    know their config only as "config.json"."""
    try:
        return fam.build(config, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{config_file}: {str(e).removeprefix('config.json: ')}") from None


def load_component(
    path: str | Path,
    component: str,
    dtype: Any = jnp.float32,
    *,
    compute_dtype: Any = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load one component of a diffusers pipeline (or a component folder) as Flax module + params.

    The weights are memory-mapped; names and shapes are checked against the module's abstract
    parameters before any tensor data is read. Then each parameter (with a mesh, each slice a device
    holds) is read into a host array of `dtype` and placed, one tensor at a time: besides what the
    devices hold, the host never holds more than one tensor, never a copy of the whole model.

    Args:
      path: a pipeline folder (with `model_index.json`), a single component folder, or a folder
        holding the `component` subfolder without `model_index.json` (a partial download).
      component: `unet | transformer | vae | text_encoder | text_encoder_2 | text_encoder_3`.
      dtype: dtype of the returned parameters (and the compute dtype unless `compute_dtype`).
      compute_dtype: dtype the module computes in, e.g. bf16 over fp32 params.
      variant: weights variant such as `"fp16"` (`diffusion_pytorch_model.fp16.safetensors`).
      allow_pickle: accept `.bin/.ckpt/.pt` weights, read with `torch.load(weights_only=True)`
        (torch materialises the whole state dict in host memory first; then as for safetensors).
      mesh: place every parameter directly with its `NamedSharding` on this mesh: each device's
        shard is read from the file (only that slice of the tensor) and converted by itself, so a
        model larger than one device, or than host RAM, loads. Without a mesh, parameters are
        uncommitted arrays on the default device.
      rules: regex sharding rules over '/'-joined parameter paths (`ctcal_jax.sharding`); default
        `ctcal_jax.sharding.DEFAULT_RULES`. Only with `mesh`.

    Returns:
      `(module, params)`: the Flax module and a dict tree of `jax.Array`s; with `mesh`,
      `params` leaves have `sharding.param_shardings(params, rules, mesh)` as their shardings.

    Raises:
      ValueError / FileNotFoundError naming the folder, file or key: missing files, unknown classes,
      unsupported config values, unexpected or missing keys and shape mismatches (checkpoint and
      model shapes), pickle weights without `allow_pickle`; a parameter no rule matches.
    """
    if component not in COMPONENT_CLASSES:
        raise ValueError(f"unknown component {component!r}; expected one of {list(COMPONENT_CLASSES)}")
    if rules is not None and mesh is None:
        raise ValueError("load_component: rules= places parameters on a mesh; pass mesh= too")
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
    module = build(fam, config, config_file, compute_dtype or dtype)
    weights = files.weights_file(folder, variant=variant, allow_pickle=allow_pickle)
    state = files.read_weights(weights)
    # Leaves are views of the memory-mapped file in the Flax layout (transposes are views): checking
    # them reads headers only.
    views = names.torch_to_flax(
        state, fam.abstract_params(module, config), source=str(weights), rename=getattr(fam, "rename", None)
    )
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    if mesh is None:
        return module, jax.tree.map(lambda x: _to_default_device(x, dtype), views)
    shardings = sharding.param_shardings(views, rules or sharding.DEFAULT_RULES, mesh)
    return module, jax.tree.map(lambda x, s: _to_mesh(x, dtype, s), views, shardings)


def _read(x: np.ndarray, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
    """`x[index]` in `dtype`, as a new C-contiguous host array: reads that slice of `x` only.

    Always a copy, even where no conversion is needed: JAX's CPU backend adopts a suitably aligned
    host array instead of copying it, and a view of the memory-mapped file must not become a
    parameter (rewriting the file in place would change it; truncating it would fault).
    """
    return np.array(x[index], dtype=dtype, order="C")


def _to_default_device(x: np.ndarray, dtype: np.dtype) -> jax.Array:
    """One tensor as an uncommitted array on the default device (what `jnp.asarray` gives)."""
    return jax.device_put(_read(x, (), dtype))


def _to_mesh(x: np.ndarray, dtype: np.dtype, target: Sharding) -> jax.Array:
    """One tensor created directly with its sharding, each addressable device's slice read and
    converted alone. Devices that hold the same slice (replicas over `data`) share one host copy, so
    the host holds at most one tensor's worth of slices at a time."""
    slices: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in slices:
            slices[key] = _read(x, index, dtype)
        return slices[key]

    return jax.make_array_from_callback(x.shape, target, read, dtype=dtype)


def config_value(config: dict[str, Any], key: str, allowed: Any, config_file: str = "config.json") -> Any:
    """`config[key]`, checked against the values this implementation supports."""
    value = config.get(key)
    if value not in allowed:
        raise ValueError(f"{config_file}: {key}={value!r} is not supported (supported: {allowed})")
    return value


def config_int(config: dict[str, Any], key: str, minimum: int = 1) -> int:
    """`config[key]`, checked to be an integer of at least `minimum` (config.json's values)."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.json: {key}={value!r} is not supported (an integer ≥ {minimum} is expected)")
    return value


def config_with_defaults(config: dict[str, Any], defaults: dict[str, Any], class_name: str) -> dict[str, Any]:
    """`defaults` updated with `config`'s values; a key `defaults` lacks (other than the `_`-prefixed
    bookkeeping) is an error naming `class_name`, and `out_channels: None` means `in_channels`."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"config.json: keys {unknown} are not supported by {class_name} here "
                         f"(known keys: {sorted(defaults)})")
    c = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    if c.get("out_channels", 0) is None:
        c["out_channels"] = c["in_channels"]
    return c

