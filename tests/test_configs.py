"""Every config in configs/ builds its step: abstract weights (no file is read, nothing runs), the
whole step traced (`jax.eval_shape`), the state's structure unchanged by a step. The `runlocal`
variants (built-in tiny pipelines) in the fast suite; the full-size ones under `slow`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

from conversion import pipeline as pipeline_io
from ctcal_jax import builder, config as config_lib

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def get_config(file: Path, arg: str = ""):
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def traced_step(config) -> dict:
    """The step of `config` traced with abstract weights; returns its metrics' shapes."""
    pipe = pipeline_io.abstract(config)
    mesh = builder.mesh_from_config(config, jax.devices()[:1])
    run = builder.build(config, pipe, mesh=mesh)
    batch = builder.abstract_batch(config, pipe)
    step = builder.step_fn(config, pipe, run.state["params"])
    new_state, metrics = jax.eval_shape(step, run.frozen, run.state, batch, jax.random.key(0))
    assert jax.tree.structure(new_state) == jax.tree.structure(run.state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                 run.state)
    return metrics


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """One folder of built-in pipelines for the module (each is written once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTCAL_JAX_CACHE", str(tmp_path_factory.mktemp("models")))
        yield


def test_every_config_is_listed():
    assert {f.stem for f in CONFIGS} >= {"demo", "sd21_ctcal", "sd3_ctcal", "sd35_taca", "gors"}


@pytest.mark.parametrize("file", CONFIGS, ids=lambda f: f.stem)
def test_every_config_has_the_api_keys_and_a_docstring_with_its_command(file):
    c = get_config(file)
    for key in ("model.pretrained", "total_steps", "batch_size", "seed", "log_every", "checkpoint_every",
                "mesh.data", "mesh.fsdp"):
        group, _, field = key.rpartition(".")
        assert field in (c[group] if group else c), key
    assert "python -m ctcal_jax.train --config configs/" in file.read_text()


@pytest.mark.parametrize("file", CONFIGS, ids=lambda f: f.stem)
def test_runlocal_variant_builds(file):
    metrics = traced_step(get_config(file, "runlocal"))
    assert "loss" in metrics and "grad_norm" in metrics


# Every ablation on SD 2.1; the same switches on SD3 once (two text streams).
@pytest.mark.parametrize("name, variant", [("sd21_ctcal", v) for v in config_lib.ABLATIONS] + [("sd3_ctcal", "all_tokens")])
def test_ablation_variants_build(name, variant):
    c = get_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.py", f"runlocal,{variant}")
    key, value = config_lib.ABLATIONS[variant]
    group, field = key.split(".")
    assert c[group][field] == value
    traced_step(c)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="no_such_variant"):
        get_config(CONFIGS[0].parent / "sd21_ctcal.py", "no_such_variant")


@pytest.mark.slow
@pytest.mark.parametrize("file", [f for f in CONFIGS if f.stem != "demo"], ids=lambda f: f.stem)
def test_full_size_config_builds(file):
    traced_step(get_config(file))
