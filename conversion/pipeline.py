"""A training config's pretrained pipeline -> `ctcal_jax.builder.Pipeline` (loaded or abstract).

`model.pretrained` is a diffusers folder, a hub id (a snapshot already in the Hugging Face cache, or
downloaded when the hub is reachable), or `builtin:<name>`: `shapes-sd2` / `shapes-sd3` (the shapes
world's trained bases, shipped in `ctcal_jax/assets/`) or `tiny-sd2` / `tiny-sd3` / `tiny-flux`
(`conversion.tiny`). `load` reads the weights, straight into their shardings when given a mesh;
`abstract` reads configs only (a local folder's, else `conversion.known`'s for the public
pipelines) and gives `jax.ShapeDtypeStruct` params, so a config's step can be lowered and compiled
on a host without the weights.

What is loaded follows the data: the VAE only when batches carry images (`data.kind` in
`IMAGE_KINDS`: "imagefolder", "shapes"), SD3's T5 only when the batches do not bring its embeddings
(`data.kind != "records"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

import ctcal_jax
from conversion import files, known, tiny
from conversion.encoders import load_encoders
from conversion.load import COMPONENT_CLASSES, build, family, load_component
from ctcal_jax import text
from ctcal_jax.builder import DENOISER, Pipeline
from ctcal_jax.data.loader import IMAGE_KINDS

FAMILIES = {"StableDiffusionPipeline": "sd2", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# The text side's family (`text.PromptEncoders.family`) of each pipeline family.
TEXT_FAMILIES = {"sd2": "sd", "sd3": "sd3", "flux": "flux"}
FLUX_SAMPLE_SIZE = 128  # FluxPipeline's default_sample_size (1024 px); FLUX transformers have no sample_size
BUILTIN = "builtin:"
# Pipelines shipped inside the package: the shapes world's pretrained bases (`ctcal_jax.pretrain_shapes`).
ASSETS = Path(ctcal_jax.__file__).resolve().parent / "assets"
SHIPPED = ("shapes-sd2", "shapes-sd3")


def resolve(pretrained: str) -> Path:
    """The local folder of `model.pretrained` (module docstring). Raises ValueError naming the value."""
    if not pretrained:
        raise ValueError("config.model.pretrained is empty: set a diffusers folder, a hub id or builtin:shapes-sd2")
    if pretrained.startswith(BUILTIN):
        name = pretrained[len(BUILTIN):]
        if name in SHIPPED:
            return ASSETS / name
        if name not in tiny.PIPELINES:
            raise ValueError(f"model.pretrained={pretrained!r}: no such built-in pipeline; available: "
                             f"{[BUILTIN + n for n in (*SHIPPED, *sorted(tiny.PIPELINES))]}")
        return tiny.materialize(name)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return path
    if path.exists() or pretrained.count("/") != 1 or pretrained.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model.pretrained={pretrained!r}: no such diffusers folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(pretrained, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model",
                                                                  "tokenizer*/*", "spiece.model"]))
    except Exception as e:  # noqa: BLE001 — any hub failure becomes one clear message
        raise ValueError(f"model.pretrained={pretrained!r} is neither a folder nor a hub id that can be fetched "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download it with "
                         f"`huggingface-cli download {pretrained}` where the hub is reachable and pass the folder") from None


def pipeline_family(folder: Path) -> str:
    """"sd2", "sd3" or "flux" from `model_index.json`'s `_class_name`."""
    index_file = folder / "model_index.json"
    cls = files.read_json(index_file).get("_class_name")
    if cls not in FAMILIES:
        raise ValueError(f"{index_file}: pipeline class {cls!r} is not supported "
                         f"(supported: {sorted(FAMILIES)})")
    return FAMILIES[cls]


def _dtypes(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    dtype = jnp.dtype(config.model.dtype)
    return dtype, jnp.dtype(config.model.compute_dtype) if config.model.compute_dtype else None


def load(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Pipeline:
    """The pipeline of `config.model.pretrained` with its weights; with `mesh`, every parameter is
    read straight into its sharding by `config.sharding.frozen` (`load_component(mesh=, rules=)`)."""
    dtype, compute = _dtypes(config)
    rules = [(str(p), tuple(a)) for p, a in config.sharding.frozen] if mesh is not None else None
    return load_folder(resolve(config.model.pretrained), dtype, compute_dtype=compute,
                       with_vae=config.data.kind in IMAGE_KINDS, with_t5=config.data.kind != "records",
                       mesh=mesh, rules=rules)


def load_folder(
    folder: str | Path,
    dtype: Any = jnp.float32,
    *,
    compute_dtype: Any = None,
    with_vae: bool = True,
    with_t5: bool = True,
    mesh: Mesh | None = None,
    rules: Any = None,
) -> Pipeline:
    """A diffusers pipeline folder (SD 1.x/2.x, SD3/3.5 or FLUX.1) as a `Pipeline`: the denoiser, the text
    encoders and tokenizers, the VAE (`with_vae`), the scheduler config; `dtype`, `compute_dtype`,
    `mesh` and `rules` as `load_component` takes them."""
    folder = Path(folder)
    fam = pipeline_family(folder)
    where = {"mesh": mesh, "rules": rules}
    name = DENOISER[fam]
    denoiser, params = load_component(folder, name, dtype, compute_dtype=compute_dtype, **where)
    encoders, text_params = load_encoders(folder, dtype, compute_dtype=compute_dtype, with_t5=with_t5, **where)
    frozen = {name: params, **text_params}
    vae = None
    if with_vae:
        vae, frozen["vae"] = load_component(folder, "vae", dtype, compute_dtype=compute_dtype, **where)
    size = files.read_json(files.component_dir(folder, name) / "config.json").get("sample_size")
    if fam == "flux" and size is None:
        size = FLUX_SAMPLE_SIZE
    return Pipeline(fam, denoiser, encoders, frozen, _scheduler(folder), vae, source=str(folder), latent_size=size)


def _scheduler(folder: Path) -> dict[str, Any]:
    return files.read_json(folder / "scheduler" / "scheduler_config.json")


def abstract(config: ml_collections.ConfigDict) -> Pipeline:
    """The pipeline of `config.model.pretrained` with `jax.ShapeDtypeStruct` params: from the local
    folder's configs when there is one (no weights read), else from `conversion.known`."""
    pretrained = config.model.pretrained
    local = None
    if pretrained.startswith(BUILTIN):
        local = resolve(pretrained)
    elif Path(pretrained).expanduser().is_dir():
        local = Path(pretrained).expanduser()
    if local is not None:
        fam = pipeline_family(local)
        configs = {c: files.read_json(files.component_dir(local, c) / "config.json")
                   for c in _components(fam, files.read_json(local / "model_index.json"), config)}
        scheduler = _scheduler(local)
    elif pretrained in known.PIPELINES:
        entry = known.PIPELINES[pretrained]
        fam, scheduler = entry["family"], entry["scheduler"]
        configs = {c: entry[c] for c in _components(fam, entry, config)}
    else:
        raise ValueError(f"model.pretrained={pretrained!r}: no local folder, and not one of the pipelines known "
                         f"without weights ({sorted(known.PIPELINES)})")
    dtype, compute = _dtypes(config)
    modules, params = {}, {}
    for c, cfg in configs.items():
        config_file = files.component_dir(local, c) / "config.json" if local else f"{pretrained}/{c}/config.json"
        cls = files.class_name(cfg, config_file)
        conv = family(cls, config_file)
        modules[c] = build(conv, cfg, config_file, compute or dtype)
        params[c] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), conv.abstract_params(modules[c], cfg))
    name = DENOISER[fam]
    texts = {c: m for c, m in modules.items() if c.startswith("text_encoder")}
    lengths = {c: 77 for c in texts} | {"sd2": {}, "sd3": {"text_encoder_3": 256}, "flux": {"text_encoder_2": 512}}[fam]
    joint = configs[name].get("joint_attention_dim") if fam == "sd3" else None
    encoders = text.PromptEncoders(TEXT_FAMILIES[fam], {}, texts, lengths, joint)
    frozen = {c: params[c] for c in (name, *texts, *(("vae",) if "vae" in modules else ()))}
    size = configs[name].get("sample_size", FLUX_SAMPLE_SIZE if fam == "flux" else None)
    return Pipeline(fam, modules[name], encoders, frozen, scheduler, modules.get("vae"), source=pretrained,
                    latent_size=size)


def _components(fam: str, index: dict[str, Any], config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The denoiser and the CLIP encoders the step runs (T5's stream is precomputed for abstract
    builds), and the VAE when the data are images (`load`'s rule)."""
    names = (DENOISER[fam], "text_encoder") + (("text_encoder_2",) if fam == "sd3" else ())
    names += ("vae",) if config.data.kind in IMAGE_KINDS else ()
    return tuple(c for c in names if c in COMPONENT_CLASSES and index.get(c) not in (None, [None, None]))
