"""Reading diffusers / transformers folders without torch: configs, safetensors, sharded indexes.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`) and the raw tensor bytes. We
read it with a numpy memory map so bf16 tensors (through `ml_dtypes`) load without torch and no
tensor is copied before it is converted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ctcal_jax.atomic import atomic_write

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_SAFETENSORS_NAMES = ("diffusion_pytorch_model", "model")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def component_dir(path: str | Path, component: str) -> Path:
    """The folder of `component`: `path/component` for a pipeline folder, else `path` itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        if component not in index:
            present = sorted(k for k, v in index.items() if isinstance(v, list))
            raise ValueError(
                f"{path / 'model_index.json'}: pipeline has no component {component!r}; "
                f"it has {present}"
            )
        folder = path / component
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: component folder named in model_index.json is missing")
        return folder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: neither a pipeline folder (model_index.json) nor a component folder (config.json)"
        )
    return path


def read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def class_name(config: dict[str, Any], config_file: Path) -> str:
    """diffusers writes `_class_name`; transformers writes `architectures`."""
    if "_class_name" in config:
        return config["_class_name"]
    archs = config.get("architectures") or []
    if len(archs) == 1:
        return archs[0]
    raise ValueError(f"{config_file}: no `_class_name` or single `architectures` entry to name the model class")


def read_safetensors(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of one safetensors file as (memory-mapped) numpy arrays, plus its metadata."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not header:
        return {}, metadata
    raw = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, stop = info["data_offsets"]
        expected = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
        if stop - start != expected or stop > raw.size:
            raise ValueError(f"{file}: tensor {name!r} has inconsistent offsets {start}..{stop}")
        tensors[name] = raw[start:stop].view(dtype).reshape(info["shape"])
    return tensors, metadata


def write_safetensors(file: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays as safetensors, atomically (a temporary file renamed into place)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in names:
            raise ValueError(f"{file}: cannot store tensor {name!r} of dtype {a.dtype}")
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(file, "wb") as f:  # a failed write leaves the existing file and no partial one
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def read_state_dict(
    folder: Path, *, variant: str | None = None, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
    """The weights of a component folder: single or sharded safetensors; pickle only on opt-in."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for stem in _SAFETENSORS_NAMES:
        single = folder / f"{stem}{suffix}"
        if single.is_file():
            return read_safetensors(single)[0]
        index = folder / f"{stem}{suffix}.index.json"
        if index.is_file():
            return _read_sharded(index)
    pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ValueError(
            f"{folder}: only pickle weights found ({', '.join(p.name for p in pickles)}); pickle files "
            "are refused by default because loading them can run code. Convert them to safetensors, "
            "or pass allow_pickle=True to load them with torch.load(weights_only=True)."
        )
    if pickles:
        return _read_pickle(pickles[0])
    raise FileNotFoundError(
        f"{folder}: no weights found (looked for {', '.join(s + suffix for s in _SAFETENSORS_NAMES)} "
        "and their .index.json shards)"
    )


def _read_sharded(index_file: Path) -> dict[str, np.ndarray]:
    index = read_json(index_file)
    if "weight_map" not in index:
        raise ValueError(f"{index_file}: no 'weight_map'")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        file = index_file.parent / shard
        if not file.is_file():
            raise FileNotFoundError(f"{file}: shard named in {index_file.name} is missing")
        out.update(read_safetensors(file)[0])
    missing = sorted(set(index["weight_map"]) - set(out))
    if missing:
        raise ValueError(f"{index_file}: tensors listed but absent from their shards: {missing[:5]}")
    return out


def _read_pickle(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"{file}: loading a pickle checkpoint needs torch (pip install 'ctcal_jax[torch]')") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError depending on the payload
        raise ValueError(f"{file}: refused by torch.load(weights_only=True): {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
