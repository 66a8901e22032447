"""The trainer end to end, as users run it: `python -m ctcal_jax.train --config configs/demo.py:runlocal`.

One uninterrupted run is the reference. Another is stopped twice — SIGTERM (preemption: it saves and
exits 143) and SIGKILL at an arbitrary moment (after a periodic checkpoint and later steps) — and
restarted with the same command each time; its per-step losses must equal the reference's. The same
config on 8 fake devices (a 2×4 mesh) must give the 1-device losses (`slow`); the exported LoRA
must load in diffusers onto the same base and reproduce our outputs. Runs share a persistent
compilation cache, so each restart compiles nothing new.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = f"{ROOT}/configs/demo.py:runlocal"


def env(tmp: Path, devices: int = 1) -> dict[str, str]:
    e = {**os.environ, "JAX_PLATFORMS": "cpu", "CTCAL_JAX_CACHE": str(tmp / "models"), "PYTHONPATH": str(ROOT)}
    if devices > 1:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def command(workdir: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ctcal_jax.train", "--config", DEMO, "--workdir", str(workdir),
            f"--config.compilation_cache_dir={cache}", *overrides]


def train(tmp: Path, workdir: Path, *overrides: str, devices: int = 1, check: bool = True):
    proc = subprocess.run(command(workdir, tmp / "xla", *overrides), env=env(tmp, devices), capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def logged_steps(workdir: Path) -> int:
    file = workdir / "metrics.jsonl"
    return len(file.read_text().splitlines()) if file.exists() else 0


def start_and_wait(tmp: Path, workdir: Path, until, *overrides: str) -> subprocess.Popen:
    proc = subprocess.Popen(command(workdir, tmp / "xla", *overrides), env=env(tmp), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not until():
        assert proc.poll() is None, f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def reference(tmp) -> Path:
    """The uninterrupted run (6 steps, checkpoints at 3 and 6)."""
    workdir = tmp / "reference"
    train(tmp, workdir)
    return workdir


def test_reference_run_leaves_what_api_md_lists(reference):
    assert (reference / "config.json").exists()
    assert sorted(losses(reference)) == [1, 2, 3, 4, 5, 6]
    assert (reference / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["3", "6"]
    assert (reference / "figures" / "attention_0000006.png").exists()
    assert list((reference / "tensorboard").iterdir())
    config = json.loads((reference / "config.json").read_text())
    for key in ("total_steps", "batch_size", "seed", "log_every", "checkpoint_every"):
        assert key in config
    assert config["model"]["pretrained"] == "builtin:shapes-sd2" and {"data", "fsdp"} <= set(config["mesh"])
    # The shapes world's exact evaluation: the base before the first step, the adapters after the last.
    evals = [json.loads(line) for line in (reference / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 6]
    assert all(0 <= e["eval/all/correct"] <= 1 and "eval/relation/relation" in e for e in evals)
    assert (reference / "figures" / "eval_0000000.png").exists() and (reference / "figures" / "eval_0000006.png").exists()


def test_preempted_and_killed_run_resumes_with_identical_losses(tmp, reference):
    workdir = tmp / "interrupted"
    # SIGTERM after step 2 is logged: saves step 2 (or 3) and exits 143.
    no_eval = "--config.eval.every=0"  # a resumable key: the evaluation draws no training randomness
    proc = start_and_wait(tmp, workdir, lambda: logged_steps(workdir) >= 2, no_eval)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-3000:]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 2
    # Restarted, then SIGKILL once step 4 is logged: checkpoint 3 is on disk, steps after it are lost.
    proc = start_and_wait(tmp, workdir, lambda: logged_steps(workdir) >= 4, no_eval)
    proc.kill()
    proc.wait(timeout=60)
    train(tmp, workdir, no_eval)
    ours, ref = losses(workdir), losses(reference)
    assert sorted(ours) == sorted(ref)
    np.testing.assert_allclose([ours[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5)


@pytest.mark.slow  # `make test` checks the step's loss and update on 1 and 8 devices (test_train_step.py)
def test_eight_devices_give_the_one_device_losses(tmp, reference):
    workdir = tmp / "mesh2x4"
    train(tmp, workdir, "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.sample_every=0",
          "--config.eval.every=0", devices=8)
    ours, ref = losses(workdir), losses(reference)
    np.testing.assert_allclose([ours[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-4)


def test_exported_lora_loads_in_diffusers_and_reproduces_our_unet(tmp, reference):
    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    from conversion import import_lora, load_component
    from conversion.pipeline import resolve

    os.environ["CTCAL_JAX_CACHE"] = str(tmp / "models")
    base = resolve(json.loads((reference / "config.json").read_text())["model"]["pretrained"])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(reference / "lora")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 64)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    unet, params = load_component(base, "unet")
    lp = import_lora(reference / "lora", {"unet": params})["unet"]
    ours, _ = jax.jit(unet.apply)({"params": params, "lora": lp}, jnp.asarray(x), jnp.asarray(t, jnp.float32),
                                  jnp.asarray(ctx))
    plain, _ = jax.jit(unet.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t, jnp.float32), jnp.asarray(ctx))
    assert np.abs(np.asarray(plain) - ref).max() > 1e-4  # the trained LoRA changes the output
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4 * np.abs(ref).max())


def test_unknown_config_key_is_one_line_without_traceback(tmp):
    proc = subprocess.run(command(tmp / "typo", tmp / "xla", "--config.no_such_key=1"), env=env(tmp),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_nan_stops_the_run_naming_step_and_metric_and_keeps_the_last_good_checkpoint(tmp):
    workdir = tmp / "nan"
    # A learning rate of 1e30 sends the adapters to inf at the first update: step 2's loss is NaN.
    proc = train(tmp, workdir, "--config.optim.groups=((r'^(unet|ae)/', 1e30, 0.0), (r'^text_encoder', 1e30, 0.0))",
                 "--config.checkpoint_every=1", "--config.log_every=3", "--config.sample_every=0",
                 "--config.eval.every=0", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite metrics at step 2" in last and "loss=nan" in last, last
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["1"]


def test_image_folder_run_encodes_with_the_vae_and_counts_bad_rows(tmp):
    """`data.kind=imagefolder`: the frozen VAE encodes the images inside the step; a missing image and
    an empty prompt are skipped, counted in metrics.jsonl, and the run goes on."""
    from PIL import Image

    folder = tmp / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    rows = []
    for i, (prompt, nouns) in enumerate([("a cat on a sofa", ["cat", "sofa"]), ("a red car", ["car"]),
                                         ("a boat on a lake", ["boat", "lake"]), ("a dog", ["dog"])]):
        Image.fromarray(rng.randint(0, 256, (300, 280, 3), np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": prompt, "nouns": nouns})
    rows += [{"file_name": "missing.png", "text": "a bird", "nouns": ["bird"]},
             {"file_name": "0.png", "text": "  ", "nouns": []}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp / "imagefolder"
    train(tmp, workdir, "--config.data.kind=imagefolder", f"--config.data.path={folder}",
          "--config.total_steps=2", "--config.sample_every=0", "--config.log_every=2")  # the reference's step: cached
    last = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 2 and np.isfinite(last["loss"])
    assert last["data/skipped_rows"] >= 2, last
