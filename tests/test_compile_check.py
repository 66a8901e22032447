"""`python -m ctcal_jax.compile_check` as users run it, and the launch scripts.

The compile check of the demo config on 8 fake CPU devices (2×4 mesh) prints its table and writes
its JSON; FSDP over 4 shrinks each device's arguments (the frozen weights are sharded); a bad
config key is one line. The launch scripts parse (`bash -n`), pass shellcheck where it is
installed, and run against stand-ins for gcloud and srun: the TPU script hands the train arguments
to every worker intact, the SLURM script forwards SIGTERM to the trainers and requeues the job once
they have saved. Full-size configs compile under `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = f"{ROOT}/configs/demo.py:runlocal"
SCRIPTS = [ROOT / "launch" / "tpu_pod.sh", ROOT / "launch" / "slurm_gpu.sbatch"]


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "CTCAL_JAX_CACHE": str(tmp / "models"), "PYTHONPATH": str(ROOT)}


def compile_check(tmp: Path, config: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctcal_jax.compile_check", "--config", config, *args],
                          env=env(tmp), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compile_check")


@pytest.fixture(scope="module")
def demo_2x4(tmp) -> tuple[str, dict]:
    out = tmp / "demo_2x4.json"
    proc = compile_check(tmp, DEMO, "--devices", "8", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                         "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_demo_on_a_2x4_mesh_prints_the_table_and_writes_the_json(demo_2x4):
    stdout, r = demo_2x4
    for row in ("mesh", "frozen params", "trainable params", "lowering", "compile", "argument / device",
                "temp / device", "total / device", "kept / device", "FLOPs / step", "fits 80 GiB"):
        assert row in stdout, row
    assert "data 2 × fsdp 4" in stdout
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4} and r["global_batch"] == 8
    assert r["params"]["frozen"] > 1e6 and 0 < r["params"]["trainable"] < r["params"]["frozen"]
    assert r["lower_s"] > 0 and r["compile_s"] > 0
    mem = r["memory_per_device"]
    assert mem["argument_bytes"] > 0 and mem["temp_bytes"] > 0 and mem["output_bytes"] > 0
    assert mem["total_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                                  + mem["temp_bytes"])
    assert r["compiled_flops_per_device"] > 0 and r["fits"] is True
    # The activations kept for the backward pass of one device's share of the batch: 8 samples over 8.
    assert r["kept_for_backward_per_device"]["micro_batch"] == 1 and r["kept_for_backward_per_device"]["bytes"] > 0
    assert r["flops_per_step"] == pytest.approx(8 * r["compiled_flops_per_device"])


@pytest.mark.slow  # make test's budget: the 2×4 demo check runs there
def test_fsdp_shards_the_frozen_weights_over_devices(tmp, demo_2x4):
    """fsdp=4 splits the frozen kernels in four (`sharding.frozen`: each one's largest axis that
    divides); embeddings, norms and small kernels stay whole on every device."""
    out = tmp / "demo_8x1.json"
    proc = compile_check(tmp, DEMO, "--devices", "8", "--config.mesh.data=8", "--config.mesh.fsdp=1",
                         "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    replicated, sharded = json.loads(out.read_text()), demo_2x4[1]
    full = replicated["memory_per_device"]["argument_bytes"]
    quarter = sharded["memory_per_device"]["argument_bytes"]
    assert replicated["bytes_per_device"]["frozen"] == replicated["param_bytes"]["frozen"]
    saved = replicated["bytes_per_device"]["frozen"] - sharded["bytes_per_device"]["frozen"]
    assert saved > 0.2 * replicated["param_bytes"]["frozen"]
    # XLA's per-device arguments shrink by exactly what the rules take off each device.
    assert quarter < full and full - quarter == saved, (quarter, full, saved)


def test_an_unknown_config_key_is_one_line(tmp):
    proc = compile_check(tmp, DEMO, "--config.no_such_key=1", timeout=120)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def fake(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)
    return path


def test_tpu_script_runs_the_trainer_on_every_worker_with_the_arguments_intact(tmp_path):
    """gcloud stands in: it runs `--command` in a bash with a fake home, where the venv's python
    prints its arguments."""
    home = tmp_path / "home"
    show = "import json, os, sys; print(json.dumps([os.environ.get('HF_HOME'), *sys.argv[1:]]))"
    fake(home / "ctcal_jax" / ".venv" / "bin" / "python", f'{sys.executable} -c "{show}" "$@"\n')
    fake(tmp_path / "bin" / "gcloud",
         'echo "gcloud $*" >&2\n'
         'while (( $# )); do [[ $1 == --command ]] && { HOME=$FAKE_HOME exec bash -c "$2"; }; shift; done\n')
    groups = "--config.optim.groups=((r'^(unet|ae)/', 1e-3, 0.0), (r'^text_encoder', 1e-4, 0.0))"
    e = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_HOME": str(home),
         "CTCAL_REMOTE_ENV": "HF_HOME=/mnt/gcs/hf"}
    proc = subprocess.run(["bash", str(SCRIPTS[0]), "my-pod", "us-east5-a", "--config", "configs/sd3_ctcal.py",
                           "--workdir", "/mnt/gcs/runs/a b", groups], env=e, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "gcloud compute tpus tpu-vm ssh my-pod" in proc.stderr and "--worker=all" in proc.stderr
    assert json.loads(proc.stdout) == ["/mnt/gcs/hf", "-m", "ctcal_jax.train", "--multihost", "--config",
                                       "configs/sd3_ctcal.py", "--workdir", "/mnt/gcs/runs/a b", groups]
    refused = subprocess.run(["bash", str(SCRIPTS[0]), "my-pod", "z", "--workdir", "gs://b/run"], env=e,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "gcsfuse" in refused.stderr


def test_slurm_script_forwards_sigterm_and_requeues_after_the_save(tmp_path):
    """srun and scontrol stand in; the trainer saves on SIGTERM and exits 143, as train.py does."""
    log = tmp_path / "log"
    fake(tmp_path / "bin" / "srun", 'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    fake(tmp_path / "bin" / "scontrol", f'echo "scontrol $*" >> {log}\n')
    trainer = fake(tmp_path / "python",
                   f'echo "args $* devices=$JAX_LOCAL_DEVICE_IDS mem=$XLA_PYTHON_CLIENT_MEM_FRACTION" >> {log}\n'
                   f'trap \'echo saved >> {log}; exit 143\' TERM\n'
                   'echo started >> ' + str(log) + '\nwhile true; do sleep 0.1; done\n')
    e = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CTCAL_PYTHON": str(trainer),
         "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "CTCAL_COMPILATION_CACHE": str(tmp_path / "xla")}
    proc = subprocess.Popen(["bash", str(SCRIPTS[1]), "--config", "configs/demo.py", "--workdir", "/shared/run"],
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while "started" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what `--signal=B:TERM@120` does
    out, _ = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert proc.returncode == 143, out
    assert lines[0] == (f"args -m ctcal_jax.train --multihost --config.compilation_cache_dir={tmp_path / 'xla'} "
                        "--config configs/demo.py --workdir /shared/run devices=0,1,2,3,4,5,6,7 mem=0.90")
    assert lines[1:] == ["started", "saved", "scontrol requeue 4242"], lines


@pytest.mark.slow
@pytest.mark.parametrize("config, args", [
    ("sd21_ctcal.py", ["--devices", "1"]),
    ("sd3_ctcal.py", ["--devices", "8", "--config.mesh.data=1", "--config.mesh.fsdp=8"]),
    ("flux_taca.py", ["--devices", "8"]),  # FLUX.1-dev's rank-64 TACA LoRA, fsdp 8 (docs/benchmarks.md)
    ("flux_taca.py", ["--devices", "1", "--config.optim.accum_steps=16"]),
], ids=["sd21_1_device", "sd3_fsdp8", "flux_fsdp8", "flux_1_device"])
def test_full_size_config_compiles(tmp, config, args, request):
    out = tmp / f"{request.node.callspec.id}.json"
    proc = compile_check(tmp, f"{ROOT}/configs/{config}", *args, "--json", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["compile_s"] > 0 and r["memory_per_device"]["temp_bytes"] > 0
    # The compiled count holds the first micro-batch and the accumulation scan's body once.
    counted = min(r["accum_steps"], 2)
    assert r["flops_per_step"] == pytest.approx(r["compiled_flops_per_device"] * r["devices"] * r["accum_steps"]
                                                / counted, rel=0.05)
