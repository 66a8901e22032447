"""Smoke test of `benchmarks/sampling.py` and `benchmarks/iterref.py`: both run end to end on the
built-in tiny models (`cpu-tiny` presets: 2 sampling steps, 2 IterRef iterations, one timed call per
side) and write their JSON, and the `--dry-run` path (what a CPU checks of the GPU presets) builds
the same tiny configs without weights. The numbers are not checked, only that the scripts run and
that both sides did the same work (equal images; equal IterRef loss, which the script asserts)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

# The benchmarks are run on accelerators, by hand; their smoke runs are with the slow checks.
pytestmark = pytest.mark.slow


def test_sampling_benchmark_runs(tmp_path):
    from benchmarks import sampling  # imported here: the script sets its environment defaults on import

    out = tmp_path / "sampling.json"
    result = sampling.main(["--preset", "cpu-tiny", "--runs", "1", "--warmup", "0", "--json", str(out)])
    assert json.loads(out.read_text())["preset"] == "cpu-tiny"
    assert result["vae_decode"] and result["jax_s_per_image"] > 0 and result["torch_s_per_image"] > 0
    assert result["jax_first_call_s"] > 0 and result["speedup"] > 0
    assert result["output_check"]["max_abs_diff"] < 1e-3  # the same images: the same work on both sides

    dry = sampling.main(["--preset", "cpu-tiny", "--dry-run", "--no-decode"])
    assert dry["params_match"] and dry["outputs"] == {"latents": "float32[1, 32, 32, 4]"}


def test_iterref_benchmark_runs(tmp_path):
    from benchmarks import iterref

    out = tmp_path / "iterref.json"
    result = iterref.main(["--preset", "cpu-tiny", "--runs", "1", "--warmup", "0", "--json", str(out)])
    assert json.loads(out.read_text())["iters"] == 2
    assert result["check"]["loss_rel_diff"] <= 1e-4 and result["check"]["grad_rel_diff"] < 1e-3
    assert all(result[f"{k}_s_per_refinement"] > 0 for k in ("jax", "torch", "torch_sdpa"))
    assert len(result["captured_torch_layers"]) == 3  # tiny UNet at 32×32: 1 down + 2 up attn2 layers at 16×16

    dry = iterref.main(["--preset", "cpu-tiny", "--dry-run"])
    assert dry["params_match"] and dry["output"] == "float32[1, 32, 32, 4]"
