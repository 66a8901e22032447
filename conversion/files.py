"""Reading diffusers / transformers folders without torch: configs, safetensors, sharded indexes.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`) and the raw tensor bytes. We
read it with a numpy memory map so bf16 tensors (through `ml_dtypes`) load without torch and no
tensor is copied before it is converted.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
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
    """The folder of `component`: `path/component` for a pipeline folder, `path` itself for a component
    folder (`config.json`), and `path/component` for a folder holding that subfolder without a
    `model_index.json` (a partial download; what `from_pretrained(path, subfolder=component)` loads)."""
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
    if (path / "config.json").is_file():
        return path
    if (path / component / "config.json").is_file():
        return path / component
    raise FileNotFoundError(
        f"{path}: neither a pipeline folder (model_index.json), a component folder (config.json) nor a "
        f"folder holding {component}/config.json"
    )


def shortlist(items: Iterable[Any], limit: int = 5) -> str:
    """`[a, b, c] ... and N more`: a list for a one-line error message, cut after `limit` items."""
    items = list(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{items[:limit]}{more}"


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
    """All tensors of one safetensors file as (memory-mapped) numpy arrays, plus its metadata.

    Raises ValueError naming the file (and the tensor) for anything that is not a well-formed
    safetensors file: a truncated file, a header that is not a JSON object of tensor entries, an
    unsupported dtype, a bad shape, or offsets outside the data.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:  # checked before reading: a corrupt length must not allocate its size
            raise ValueError(f"{file}: safetensors header of {n} bytes declared, but the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: safetensors header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{file}: safetensors __metadata__ is not an object of strings")
    if not header:
        return {}, metadata
    data = size - 8 - n
    raw = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n) if data else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        dtype, shape, (start, stop) = _tensor_info(file, name, info, data)
        tensors[name] = raw[start:stop].view(dtype).reshape(shape)
    return tensors, metadata


def _tensor_info(file: Path, name: str, info: Any, data: int) -> tuple[np.dtype, list[int], tuple[int, int]]:
    """`(dtype, shape, (start, stop))` of one header entry, checked against `data` bytes of tensor data."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{where}: header entry {str(info)[:80]} is not {{dtype, shape, data_offsets}}")
    if not isinstance(info["dtype"], str) or info["dtype"] not in _DTYPES:
        raise ValueError(f"{where} has unsupported dtype {str(info['dtype'])[:40]}")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{where} has shape {str(shape)[:80]}: expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data):
        raise ValueError(f"{where} has data_offsets {str(offsets)[:80]}: expected [start, stop] within the "
                         f"{data} bytes of tensor data")
    start, stop = offsets
    if stop - start != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{where} has inconsistent offsets {start}..{stop} for shape {shape} of {info['dtype']}")
    return dtype, shape, (start, stop)


def write_safetensors(file: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays as safetensors, atomically (a temporary file renamed into place)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        # np.ascontiguousarray turns a 0-d array into shape (1,): keep the tensor's own shape.
        a = np.asarray(tensors[name], order="C")
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


def weights_file(folder: Path, *, variant: str | None = None, allow_pickle: bool = False) -> Path:
    """The weights of a component folder: its safetensors file or `.index.json` of shards; a pickle
    file only on opt-in."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for stem in _SAFETENSORS_NAMES:
        for name in (f"{stem}{suffix}", f"{stem}{suffix}.index.json"):
            if (folder / name).is_file():
                return folder / name
    pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ValueError(
            f"{folder}: only pickle weights found ({', '.join(p.name for p in pickles)}); pickle files "
            "are refused by default because loading them can run code. Convert them to safetensors, "
            "or pass allow_pickle=True to load them with torch.load(weights_only=True)."
        )
    if pickles:
        return pickles[0]
    raise FileNotFoundError(
        f"{folder}: no weights found (looked for {', '.join(s + suffix for s in _SAFETENSORS_NAMES)} "
        "and their .index.json shards)"
    )


def read_weights(file: Path) -> dict[str, np.ndarray]:
    """The state dict in `file` (from `weights_file`): safetensors, a shard index or a pickle."""
    if file.name.endswith(".index.json"):
        return _read_sharded(file)
    if file.suffix == ".safetensors":
        return read_safetensors(file)[0]
    return _read_pickle(file)


def read_state_dict(
    folder: Path, *, variant: str | None = None, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
    """The weights of a component folder: single or sharded safetensors; pickle only on opt-in."""
    return read_weights(weights_file(folder, variant=variant, allow_pickle=allow_pickle))


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
