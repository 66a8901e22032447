"""LoRA files <-> `ctcal_jax.lora` pytrees, and export of merged weights as a diffusers folder.

Read:
- diffusers / peft: `{component}.{module}.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`
  (also the older `.lora.down/.up` and `.lora_linear_layer.down/.up` spellings). Alphas come from
  the safetensors metadata `lora_adapter_metadata`: the peft `LoraConfig` of each component under
  its prefix (`unet.lora_alpha`, `unet.alpha_pattern`, `unet.use_rslora`, ...), which diffusers
  passes to `LoraConfig(**...)` when loading; else from `{component}.{module}.alpha` tensors; else
  alpha = rank, diffusers' rule for files without alphas.
- kohya: `lora_unet_{module}`, `lora_te_`/`lora_te1_` (text_encoder), `lora_te2_` (text_encoder_2)
  with `.lora_down.weight`, `.lora_up.weight`, `.alpha`; the module path is written with `_` for
  `.`, split back with the multi-word module names below (or exactly, given the params).
Written: the diffusers / peft form with `lora_adapter_metadata`, what
`DiffusionPipeline.load_lora_weights(dir)` reads, alpha ≠ rank included.

Components are `unet`, `transformer`, `text_encoder`, `text_encoder_2`. transformers' CLIP may
or may not nest its modules under `text_model` (transformers 5 flattens `CLIPTextModel` only):
files carry the `text_model.` prefix, which diffusers strips when the model has none, and the peft
config names modules without it, which matches either way (peft matches module-name suffixes).
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from conversion import files, load, names
from ctcal_jax import lora
from ctcal_jax.atomic import atomic_write

LORA_FILE = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")

_DIFFUSERS_TAILS = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora.down.weight": "A", ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A", ".lora_linear_layer.up.weight": "B",
    ".alpha": "alpha",
}
_KOHYA_TAILS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}

# Module names containing `_` in the diffusers UNet / SD3 transformer and transformers' CLIP;
# kohya writes every `.` of a module path as `_`, and these are the parts that keep theirs.
_MODULE_WORDS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q",
    "to_k", "to_v", "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "time_embedding", "linear_1", "linear_2", "norm_out", "context_embedder", "pos_embed",
    "time_text_embed", "timestep_embedder", "text_embedder", "norm1_context", "ff_context",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "final_layer_norm", "text_projection",
})
_MAX_WORDS = max(len(w.split("_")) for w in _MODULE_WORDS)

Adapters = dict[str, dict[str, Any]]  # one component: dotted module path -> {"A", "B", "alpha"}


def import_lora(
    path: str | Path,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    allow_pickle: bool = False,
) -> dict[str, lora.LoraTree]:
    """Read a diffusers/peft or kohya LoRA file into `{component: LoRA tree}` (`ctcal_jax.lora`).

    Args:
      path: the `.safetensors` file, or a folder holding `pytorch_lora_weights.safetensors` (or a
        single `.safetensors` file).
      params: optional `{component: params}`. Module names of those components are then resolved
        against the params' Dense layers (kohya names exactly; `text_model.` either way) and
        checked against the kernel shapes; the file's other components come back unchecked. A
        file sharing no component with `params` (a transformer LoRA given UNet params) is an error.
      allow_pickle: read a `.bin/.pt/.ckpt` file with `torch.load(weights_only=True)`.

    Only the components present in the file are returned. Raises `ValueError` naming the keys
    that are not LoRA weights of a supported kind (DoRA, LoHa, convolution LoRA, biases) or,
    with `params`, that match no Dense layer, and naming both sides when the file holds
    components that `params` lacks (a transformer LoRA given UNet params).
    """
    file = _lora_file(Path(path))
    if file.suffix == ".safetensors":
        tensors, metadata = files.read_safetensors(file)
    elif allow_pickle:
        tensors, metadata = files._read_pickle(file), {}
    else:
        raise ValueError(f"{file}: pickle LoRA files are refused by default because loading them can run "
                         "code; convert to safetensors or pass allow_pickle=True")
    parts: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    keys: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    unknown = []
    for key, tensor in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        component, module, part = parsed
        parts.setdefault(component, {}).setdefault(module, {})[part] = tensor
        keys[component, module].append(key)
    if unknown:
        raise ValueError(f"{file}: {len(unknown)} of {len(tensors)} keys are not LoRA weights of a supported "
                         f"format (diffusers/peft lora_A/lora_B, kohya lora_down/lora_up): "
                         f"{files.shortlist(sorted(unknown))}")
    if not parts:
        raise ValueError(f"{file}: no LoRA weights (the file holds no tensors)")
    if params is not None and not set(parts) & set(params):
        raise ValueError(f"{file}: LoRA for components {sorted(parts)} but params= holds {sorted(params)}: "
                         f"none of them; pass the params of the file's components, or no params")
    configs = _read_configs(file, metadata)
    out, problems = {}, []
    for component, modules in parts.items():
        out[component] = {}
        for module, p in modules.items():
            try:
                out[component][module] = _adapter(p, module, configs.get(component))
            except ValueError as e:
                problems.append(f"{sorted(keys[component, module])}: {e}")
    for component in set(out) & set(params or {}):
        out[component] = _resolve(out[component], params[component], component, keys, problems)
    if problems:
        raise ValueError(f"{file}: {len(problems)} LoRA modules cannot be used: "
                         + "; ".join(problems[:5])
                         + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""))
    return {component: lora.from_paths({_flax_path(component, m): ab for m, ab in adapters.items()})
            for component, adapters in out.items()}


def export_lora(out_dir: str | Path, loras: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write `{component: LoRA tree}` (`ctcal_jax.lora`) as `out_dir/pytorch_lora_weights.safetensors`.

    The diffusers / peft format with each component's `LoraConfig` (rank, alpha and per-module
    `rank_pattern` / `alpha_pattern`) in the `lora_adapter_metadata`, so that
    `pipe.load_lora_weights(out_dir)` reproduces `lora.merge`. The file is replaced atomically.
    Returns the file's path.
    """
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, Any] = {}
    for component, lp in loras.items():
        if component not in COMPONENTS:
            raise ValueError(f"cannot export LoRA for component {component!r}; expected one of {COMPONENTS}")
        ranks, alphas = {}, {}
        for path, ab in sorted(lora.adapters(lp).items()):
            module = names.join_path(path)
            a, b = np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32)
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(f"{component}: {module}: expected A [in, r] and B [r, out], got "
                                 f"A {a.shape}, B {b.shape}")
            key = f"{component}.{_file_module(component, module)}"
            tensors[f"{key}.lora_A.weight"] = a.T
            tensors[f"{key}.lora_B.weight"] = b.T
            name = _config_module(component, module)
            ranks[name], alphas[name] = a.shape[1], _number(lora.alpha(ab))
        if ranks:
            metadata.update({f"{component}.{k}": v for k, v in _peft_config(ranks, alphas).items()})
    if not tensors:
        raise ValueError("no LoRA weights to export")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    file = out_dir / LORA_FILE
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}
    files.write_safetensors(file, tensors, header)
    return file


def export_component(
    out_dir: str | Path, params: Mapping[str, Any], source: str | Path, component: str
) -> Path:
    """Write Flax `params` (e.g. `lora.merge(params, lp)`) as a diffusers/transformers model folder.

    `config.json` is copied from `component` of the `source` pipeline (or component) folder, the
    weights go to `diffusion_pytorch_model.safetensors` (diffusers classes) or `model.safetensors`
    (transformers classes) under the source's PyTorch names, with the buffers our models compute
    instead of storing (`pos_embed.pos_embed`, `position_ids`) copied from the source, so
    `from_pretrained(out_dir)` loads them. Each file is replaced atomically. Raises `ValueError`
    naming the keys when the params do not cover the source's weights exactly. Returns `out_dir`.
    """
    folder = files.component_dir(source, component)
    config_file = folder / "config.json"
    config = files.read_json(config_file)
    family = load.family(files.class_name(config, config_file), config_file)
    rename = getattr(family, "rename", None)
    reference = files.read_state_dict(folder)
    # The name `flax_to_torch` gives each parameter -> the source's name for it (they differ only
    # for keys a family renames when loading). Keys the family skips are the buffers above.
    source_key, buffers = {}, {}
    for key in reference:
        path = rename(key) if rename is not None else names.split_key(key)
        if path is None:
            buffers[key] = reference[key]
        else:
            source_key[names.join_path(path[:-1]) + "." + path[-1]] = key
    state = {source_key.get(k, k): v for k, v in names.flax_to_torch(params).items()}
    missing = sorted(set(source_key.values()) - set(state))
    unexpected = sorted(set(state) - set(source_key.values()))
    mismatched = sorted(f"{k}: {state[k].shape} vs {reference[k].shape}" for k in set(state) & set(reference)
                        if state[k].shape != reference[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"params do not match the weights of {folder}: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {mismatched}")
    state.update(buffers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = "diffusion_pytorch_model.safetensors" if "_class_name" in config else "model.safetensors"
    files.write_safetensors(out_dir / weights, state, {"format": "pt"})
    with atomic_write(out_dir / "config.json") as f:
        f.write(config_file.read_text())
    return out_dir


def _lora_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such LoRA file or folder")
    if (path / LORA_FILE).is_file():
        return path / LORA_FILE
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: no {LORA_FILE}, and {len(found)} other .safetensors files "
                                f"({[f.name for f in found]}); pass the file itself")
    return found[0]


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """`(component, dotted module path, "A" | "B" | "alpha")`, or None for a key of no known kind."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, tail = key.partition(".")
            part = _KOHYA_TAILS.get(tail)
            return (component, _kohya_module(name[len(prefix):]), part) if part else None
    component, _, rest = key.partition(".")
    if component in COMPONENTS:
        for tail, part in _DIFFUSERS_TAILS.items():
            if rest.endswith(tail) and len(rest) > len(tail):
                return component, rest[: -len(tail)], part
    return None


def _kohya_module(name: str) -> str:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` -> `down_blocks.0.…attn1.to_out.0`."""
    words, parts, i = name.split("_"), [], 0
    while i < len(words):
        n = next(n for n in range(min(_MAX_WORDS, len(words) - i), 0, -1)
                 if n == 1 or "_".join(words[i:i + n]) in _MODULE_WORDS)
        parts.append("_".join(words[i:i + n]))
        i += n
    return ".".join(parts)


def _read_configs(file: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The peft `LoraConfig` fields of each component from diffusers' `lora_adapter_metadata`."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: lora_adapter_metadata is not valid JSON ({e})") from None
    if not isinstance(flat, dict):
        raise ValueError(f"{file}: lora_adapter_metadata is a JSON {type(flat).__name__}, expected an object "
                         "of `component.field` keys")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.rpartition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _adapter(parts: Mapping[str, np.ndarray], module: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    if "A" not in parts or "B" not in parts:
        raise ValueError("a down/A weight and an up/B weight are both needed")
    a, b = parts["A"], parts["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"shapes {a.shape} and {b.shape} are not a Linear LoRA pair "
                         "(convolution LoRA is not supported)")
    rank = a.shape[0]
    if "alpha" in parts:
        value = np.asarray(parts["alpha"], np.float64)
        if value.size != 1:  # kohya files in the wild carry shape () or (1,)
            raise ValueError(f"alpha of shape {value.shape}: expected one number")
        alpha = float(value.reshape(()))
        if not math.isfinite(alpha):
            raise ValueError(f"alpha {alpha}: expected a finite number")
    elif config is not None:
        alpha = _config_alpha(config, module, rank)
    else:
        alpha = float(rank)
    return {"A": jnp.asarray(np.asarray(a, np.float32).T), "B": jnp.asarray(np.asarray(b, np.float32).T),
            "alpha": lora.Alpha(alpha)}


def _config_alpha(config: Mapping[str, Any], module: str, rank: int) -> float:
    """Our alpha (scale = alpha / rank) for `module` under a peft `LoraConfig` (defaults r = alpha = 8)."""
    if config.get("use_dora"):
        raise ValueError("DoRA adapters are not supported")
    r = _pattern_value(config, "rank_pattern", module, config.get("r", 8))
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"lora_adapter_metadata: rank {r!r} is not an integer")
    if r != rank:
        raise ValueError(f"the metadata gives rank {r} but the weights have rank {rank}")
    alpha = _pattern_value(config, "alpha_pattern", module, config.get("lora_alpha", 8))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"lora_adapter_metadata: lora_alpha {alpha!r} is not a finite number")
    # rsLoRA scales by alpha / sqrt(r).
    return float(alpha) * rank**0.5 if config.get("use_rslora") else float(alpha)


def _pattern_value(config: Mapping[str, Any], field: str, module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the first pattern of `config[field]` matching a suffix of the module name."""
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"lora_adapter_metadata: {field} {patterns!r} is not an object of pattern -> value")
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error as e:
            raise ValueError(f"lora_adapter_metadata: {field} key {pattern!r} is not a regular expression "
                             f"({e})") from None
    return default


def _resolve(adapters: Adapters, params: Mapping[str, Any], component: str,
             keys: Mapping[tuple[str, str], list[str]], problems: list[str]) -> Adapters:
    """Rename file module paths to the params' Dense module paths; note what matches nothing."""
    dense = {m: shape for m, (_, shape) in lora.kernels(params).items() if len(shape) == 2}
    by_flat = collections.defaultdict(list)
    for m in dense:
        by_flat[_flat(m)].append(m)
    out: Adapters = {}
    for module, ab in adapters.items():
        found = [module] if module in dense else by_flat.get(_flat(module), [])
        file_keys = sorted(keys[component, module])
        if len(found) != 1:
            problems.append(f"{file_keys}: match no Dense layer of the {component} params")
        elif (ab["A"].shape[0], ab["B"].shape[1]) != dense[found[0]]:
            problems.append(f"{file_keys}: adapter {ab['A'].shape[0]} -> {ab['B'].shape[1]} does not fit "
                            f"{found[0]} kernel {dense[found[0]]}")
        elif found[0] in out:
            problems.append(f"{file_keys}: a second adapter for {found[0]}")
        else:
            out[found[0]] = ab
    return out


def _flax_path(component: str, module: str) -> names.Path:
    """The Flax module path of a file's module name; CLIP modules live under `text_model` here."""
    if component.startswith("text_encoder") and not module.startswith(("text_model.", "text_projection")):
        module = "text_model." + module
    return names.split_key(module)


def _flat(module: str) -> str:
    """A module path with `.` and `_` made alike and without transformers' optional `text_model.`."""
    return module.removeprefix("text_model.").replace(".", "_")


def _file_module(component: str, module: str) -> str:
    """The module name written to the file: CLIP layers under `text_model.` (see the module docstring)."""
    if component.startswith("text_encoder") and module.startswith("encoder.layers."):
        return "text_model." + module
    return module


def _config_module(component: str, module: str) -> str:
    return module.removeprefix("text_model.") if component.startswith("text_encoder") else module


def _peft_config(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """The peft `LoraConfig` fields that reproduce per-module ranks and alphas."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
    }


def _number(x: float) -> int | float:
    """An alpha as the JSON number that prints its float32 value (4 -> 4, 0.1 -> 0.1)."""
    x = np.float32(x)
    return int(x) if x == int(x) else float(str(x))
