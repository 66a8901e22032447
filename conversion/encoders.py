"""`load_encoders`: the tokenizers and text encoders of a diffusers pipeline folder, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from conversion import files
from conversion.load import load_component
from ctcal_jax.sharding import Rules
from ctcal_jax.text import T5_COMPONENT, TOKENIZERS, Family, PromptEncoders

_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")


def load_encoders(
    path: str | Path,
    dtype: Any = jnp.float32,
    *,
    compute_dtype: Any = None,
    max_sequence_length: int | None = None,
    with_t5: bool = True,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> tuple[PromptEncoders, dict[str, Any]]:
    """Tokenizers and text encoders of a diffusers pipeline folder, offline: `(encoders, params)`.

    SD 1.x/2.x folders hold `text_encoder` (+ `tokenizer`); SD3 folders add `text_encoder_2` and,
    unless saved without it, `text_encoder_3` (T5); FLUX.1 folders (`FluxPipeline`) hold CLIP-L as
    `text_encoder` and T5 as `text_encoder_2`. `dtype`/`compute_dtype`/`mesh`/`rules` as in
    `load_component`; `max_sequence_length` is the T5 token count (default the pipelines': SD3 256,
    FLUX.1 512). `with_t5=False` loads T5's tokenizer but not its weights (data that brings
    precomputed T5 embeddings: a T5-XXL is 4.7 B parameters the step would only hold).
    """
    path = Path(path)
    index = files.read_json(path / "model_index.json")
    if index.get("_class_name") == "FluxPipeline":
        family: Family = "flux"
    elif "text_encoder_3" in index:
        family = "sd3"
    elif "text_encoder_2" in index:
        raise ValueError(f"{path / 'model_index.json'}: a text_encoder_2 without text_encoder_3 (SDXL?) is not supported")
    else:
        family = "sd"
    components = {"sd": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
                  "flux": ("text_encoder", "text_encoder_2")}[family]
    t5 = T5_COMPONENT.get(family)
    tokenizers, models, params = {}, {}, {}
    for c in components:
        if _absent(index, c):
            if c != "text_encoder_3":
                raise ValueError(f"{path / 'model_index.json'}: the pipeline has no {c}")
            continue
        tokenizers[c] = _load_tokenizer(path, TOKENIZERS[c], index)
        if c == t5 and not with_t5:
            continue
        models[c], params[c] = load_component(path, c, dtype, compute_dtype=compute_dtype, mesh=mesh, rules=rules)
    clip_length = tokenizers["text_encoder"].model_max_length
    max_lengths = {"text_encoder": clip_length}
    joint_dim = None
    if family == "flux":
        max_lengths.update(text_encoder_2=max_sequence_length or 512)
    if family == "sd3":
        max_lengths.update(text_encoder_2=clip_length, text_encoder_3=max_sequence_length or 256)
        if "text_encoder_3" not in tokenizers:
            joint_dim = files.read_json(files.component_dir(path, "transformer") / "config.json")["joint_attention_dim"]
    return PromptEncoders(family, tokenizers, models, max_lengths, joint_dim), params


def _absent(index: dict[str, Any], component: str) -> bool:
    entry = index.get(component)
    return not isinstance(entry, list) or entry[0] is None


def _load_tokenizer(path: Path, component: str, index: dict[str, Any]) -> Any:
    if _absent(index, component):
        raise ValueError(f"{path / 'model_index.json'}: the pipeline has no {component}")
    cls = index[component][1]
    if cls not in _TOKENIZER_CLASSES:
        raise ValueError(f"{path / 'model_index.json'}: tokenizer class {cls!r} of {component} is not supported "
                         f"(supported: {_TOKENIZER_CLASSES})")
    folder = path / component
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder named in model_index.json is missing")
    import transformers  # imported here: only loading needs it, and it is slow to import

    return getattr(transformers, cls).from_pretrained(folder)
