r"""LoRA files <-> `ctcal_jax.lora` pytrees, and export of merged weights as a diffusers folder.

Read:
- diffusers / peft: `{component}.{module}.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`
  (also the older `.lora.down/.up` and `.lora_linear_layer.down/.up` spellings). Alphas come from
  the safetensors metadata `lora_adapter_metadata`: the peft `LoraConfig` of each component under
  its prefix (`unet.lora_alpha`, `unet.alpha_pattern`, `unet.use_rslora`, ...), which diffusers
  passes to `LoraConfig(**...)` when loading; else from `{component}.{module}.alpha` tensors; else
  alpha = rank, diffusers' rule for files without alphas.
- kohya: `lora_unet_{module}`, `lora_transformer_{module}` (transformer), `lora_te_`/`lora_te1_`
  (text_encoder), `lora_te2_` (text_encoder_2) with `.lora_down.weight`, `.lora_up.weight`, `.alpha`;
  the module path is written with `_` for `.`, split back with the multi-word module names below
  (or exactly, given the params).
- FLUX.1 under BFL's original module names (`conversion.flux.ORIGINAL_MODULES`), read into the
  transformer's diffusers modules:
  kohya / sd-scripts `lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight` (also `_img_attn_proj`,
  `_img_mlp_0/2`, `_img_mod_lin`, the same with `txt_`, `lora_unet_single_blocks_{i}_linear1`,
  `_linear2`, `_modulation_lin`, `lora_unet_img_in`, `_txt_in`, `_time_in_in_layer`, `_vector_in_…`,
  `_guidance_in_…`, `_final_layer_linear`, `_final_layer_adaLN_modulation_1`), and the dotted names
  (`double_blocks.{i}.img_attn.qkv`) bare or under `diffusion_model.` (ComfyUI, BFL), `transformer.`
  or `base_model.model.`, with `lora_A/lora_B` or `lora_down/lora_up` weights and `.alpha`. As
  diffusers converts them: a fused layer's down (A) weight is shared by the modules it holds and its
  up (B) rows are split between them (`qkv` into q, k, v; `linear1` into q, k, v and `proj_mlp`,
  3·D + 4·D rows), each module keeping the layer's rank and alpha, so every module's update is its
  rows of the layer's `(alpha / r) · up @ down`; when the up weight is block-diagonal (rank a
  multiple of the split count, every other block zero) each module instead gets its own block of
  rank r/n, with alpha / n. The final modulation's up rows go from BFL's (shift, scale) to diffusers'
  (scale, shift). Without `.alpha`, alpha = rank (scale 1). Unlike diffusers 0.42, the layers
  outside the blocks (`img_in`, `final_layer`, ...) are kept and take their alphas.
Written: the diffusers / peft form with `lora_adapter_metadata`, what
`DiffusionPipeline.load_lora_weights(dir)` reads (`FluxPipeline`'s for a FLUX.1 transformer), alpha ≠
rank included; the per-module rank and alpha patterns anchored at the module path's start (`^`).

Components are `unet`, `transformer`, `text_encoder`, `text_encoder_2`. transformers' CLIP may
or may not nest its modules under `text_model` (transformers 5 flattens `CLIPTextModel` only):
files carry the `text_model.` prefix, which diffusers strips when the model has none, and the peft
config names modules without it, which matches either way (peft matches module-name suffixes; the
anchored patterns allow the prefix, `^(text_model\.)?`).
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

from conversion import files, flux, load, names
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
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_transformer_": "transformer", "lora_te_": "text_encoder",
                   "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# FLUX.1 under BFL's module names (`flux.ORIGINAL_MODULES`): the prefixes and tails seen in the wild.
_ORIGINAL_PREFIXES = ("lora_unet_", "diffusion_model.", "transformer.", "base_model.model.", "")
_ORIGINAL_TAILS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A",
                   ".lora_up.weight": "B", ".alpha": "alpha"}
_ORIGINAL_ROOTS = re.compile(r"(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)"
                             r"([._]|$)")

# Module names containing `_` in the diffusers UNet / SD3 and FLUX transformers and transformers' CLIP;
# kohya writes every `.` of a module path as `_`, and these are the parts that keep theirs.
_MODULE_WORDS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q",
    "to_k", "to_v", "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "time_embedding", "linear_1", "linear_2", "norm_out", "context_embedder", "pos_embed",
    "time_text_embed", "timestep_embedder", "text_embedder", "norm1_context", "ff_context",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "final_layer_norm", "text_projection", "single_transformer_blocks",
    "proj_mlp", "x_embedder", "guidance_embedder",
})
_MAX_WORDS = max(len(w.split("_")) for w in _MODULE_WORDS)

Adapters = dict[str, dict[str, Any]]  # one component: dotted module path -> {"A", "B", "alpha"}


def import_lora(
    path: str | Path,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    allow_pickle: bool = False,
) -> dict[str, lora.LoraTree]:
    """Read a diffusers/peft or kohya LoRA file, or a FLUX one under BFL's module names, into
    `{component: LoRA tree}` (`ctcal_jax.lora`; the formats are listed in the module docstring).

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
    originals: dict[str, dict[str, np.ndarray]] = {}  # FLUX layers under BFL's names
    unknown, problems = [], []
    for key, tensor in tensors.items():
        original = _parse_original_key(key)
        if original is not None:
            written, part = original
            component, name = "transformer", flux.original_module(written)
            if name is None:
                problems.append(f"{key}: names no FLUX.1 layer (conversion.flux.ORIGINAL_MODULES)")
                continue
            slot = originals.setdefault(name, {})
        else:
            parsed = _parse_key(key)
            if parsed is None:
                unknown.append(key)
                continue
            component, name, part = parsed
            slot = parts.setdefault(component, {}).setdefault(name, {})
        if part in slot:
            problems.append(f"{sorted(keys[component, name] + [key])}: two {part} tensors for one module")
        slot[part] = tensor
        keys[component, name].append(key)
    if unknown:
        raise ValueError(f"{file}: {len(unknown)} of {len(tensors)} keys are not LoRA weights of a supported "
                         f"format (diffusers/peft lora_A/lora_B, kohya lora_down/lora_up, FLUX.1 under BFL's "
                         f"names): {files.shortlist(sorted(unknown))}")
    for name, p in originals.items():
        try:
            split = _split_original(name, p)
        except ValueError as e:
            problems.append(f"{sorted(keys['transformer', name])}: {e}")
            continue
        for module, sub in split.items():
            if module in parts.get("transformer", {}):
                problems.append(f"{sorted(keys['transformer', name])}: a second adapter for {module} (also "
                                f"{sorted(keys['transformer', module])})")
                continue
            parts.setdefault("transformer", {})[module] = sub
            keys["transformer", module] = keys["transformer", name]
    if not parts and not problems:
        raise ValueError(f"{file}: no LoRA weights (the file holds no tensors)")
    if parts and params is not None and not set(parts) & set(params):
        raise ValueError(f"{file}: LoRA for components {sorted(parts)} but params= holds {sorted(params)}: "
                         f"none of them; pass the params of the file's components, or no params")
    configs = _read_configs(file, metadata)
    out = {}
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
            metadata.update({f"{component}.{k}": v for k, v in _peft_config(component, ranks, alphas).items()})
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


def _parse_original_key(key: str) -> tuple[str, str] | None:
    """`(module name as written, "A" | "B" | "alpha")` of a key under one of FLUX.1's BFL roots
    (`double_blocks`, `img_in`, ...; module docstring), or None."""
    for tail, part in _ORIGINAL_TAILS.items():
        if key.endswith(tail):
            name = key[: -len(tail)]
            for prefix in _ORIGINAL_PREFIXES:
                if name.startswith(prefix) and _ORIGINAL_ROOTS.match(name[len(prefix):]):
                    return name[len(prefix):], part
    return None


def _split_original(name: str, parts: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The LoRA parts (`A [r, in]`, `B [out, r]`, alpha) of the diffusers modules that the BFL layer
    `name` holds, as diffusers' `_convert_kohya_flux_lora_to_diffusers` splits them (module docstring)."""
    if "A" not in parts or "B" not in parts:
        raise ValueError("a down/A weight and an up/B weight are both needed")
    a, b = np.asarray(parts["A"]), np.asarray(parts["B"])
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"shapes {a.shape} and {b.shape} are not a Linear LoRA pair")
    rank = a.shape[0]
    alpha = _alpha(parts["alpha"]) if "alpha" in parts else float(rank)
    split = flux.original_split(name, b.shape[0])
    n = len(split)
    blocks = [np.arange(j * rank // n, (j + 1) * rank // n) for j in range(n)]
    if n > 1 and rank % n == 0 and all(not b[np.ix_(rows, blocks[k])].any()
                                       for j, (_, rows) in enumerate(split) for k in range(n) if k != j):
        return {module: {"A": a[blocks[j]], "B": b[np.ix_(rows, blocks[j])], "alpha": np.float64(alpha / n)}
                for j, (module, rows) in enumerate(split)}
    return {module: {"A": a, "B": b[rows], "alpha": np.float64(alpha)} for module, rows in split}


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
    if rank == 0:
        raise ValueError(f"shapes {a.shape} and {b.shape}: rank 0")
    if "alpha" in parts:
        alpha = _alpha(parts["alpha"])
    elif config is not None:
        alpha = _config_alpha(config, module, rank)
    else:
        alpha = float(rank)
    return {"A": jnp.asarray(np.asarray(a, np.float32).T), "B": jnp.asarray(np.asarray(b, np.float32).T),
            "alpha": lora.Alpha(alpha)}


def _alpha(tensor: np.ndarray) -> float:
    """A LoRA alpha tensor as a finite float."""
    value = np.asarray(tensor, np.float64)
    if value.size != 1:  # kohya files in the wild carry shape () or (1,)
        raise ValueError(f"alpha of shape {value.shape}: expected one number")
    alpha = float(value.reshape(()))
    if not math.isfinite(alpha):
        raise ValueError(f"alpha {alpha}: expected a finite number")
    return alpha


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


def _peft_config(component: str, ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """The peft `LoraConfig` fields that reproduce per-module ranks and alphas.

    peft matches a pattern against any dotted suffix of a module path, so patterns are anchored with
    `^` (as diffusers writes them, peft#2419): FLUX's `proj_out` must not also name
    `single_transformer_blocks.0.proj_out`; CLIP's may start with `text_model.` (module docstring).
    (A `target_modules` entry matches suffixes too, so such a module gets an extra adapter there,
    which the file leaves at peft's zero B: no effect.)
    """
    start = r"^(text_model\.)?" if component.startswith("text_encoder") else "^"
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {start + re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {start + re.escape(m): v for m, v in alphas.items() if v != alpha},
    }


def _number(x: float) -> int | float:
    """An alpha as the JSON number that prints its float32 value (4 -> 4, 0.1 -> 0.1)."""
    x = np.float32(x)
    return int(x) if x == int(x) else float(str(x))
