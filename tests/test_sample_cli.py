"""`python -m ctcal_jax.sample` as users run it, on the shipped shapes-world base (configs/demo.py, 32 px)
and the built-in tiny SD3 (configs/sd35_taca.py:runlocal), a few steps: the files of each layout, overlays, TACA, the
IterRef step sweep (one compiled program for every candidate step) and the one-line errors.

Stanza's models are not on this machine: subjects come from the prompt file's "subjects" or from a
toy tagger module written beside the test (`--config.sample.tagger=toytag:tag`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
FAST = ["--config.sample.num_inference_steps=2", "--config.sample.height=32", "--config.sample.width=32"]
TAGGER = '''import re
NOUNS = {"cat", "dog", "apple", "bird"}
def tag(prompt):
    return [(m.group(), "NOUN" if m.group().lower() in NOUNS else "X", m.start(), m.end())
            for m in re.finditer(r"\\w+", prompt)]
'''


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sample")
    (d / "toytag.py").write_text(TAGGER)
    return d


def sample(tmp: Path, *args: str, config: str = DEMO, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp}"}
    proc = subprocess.run([sys.executable, "-m", "ctcal_jax.sample", "--config", config, *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"sample failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_plain_layout_grid_prompts_jsonl_and_overlays(tmp):
    out = tmp / "plain"
    proc = sample(tmp, *FAST, "--prompt", "a cat and a dog", "--prompt", "a red apple", "--out", str(out),
                  "--config.sample.n_per_prompt=2", "--config.sample.batch_size=2", "--config.sample.seed=7",
                  "--config.sample.overlays=True", "--config.sample.tagger=toytag:tag")
    assert "wrote 4 images" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png", "overlays", "prompts.jsonl"]
    assert png(out / "00000.png").shape == (32, 32, 3)
    assert not np.array_equal(png(out / "00000.png"), png(out / "00001.png"))  # seeds 7 and 8
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["sample"], r["seed"]) for r in rows] == [
        ("00000.png", "a cat and a dog", 0, 7), ("00001.png", "a cat and a dog", 1, 8),
        ("00002.png", "a red apple", 0, 7), ("00003.png", "a red apple", 1, 8)]
    settings = rows[0]["settings"]
    assert settings["num_inference_steps"] == 2 and settings["scheduler"] == "ddim" and settings["iterref"] is None
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    # Two subjects (cat, dog) make the first figure wider than the one-subject (apple) figure.
    assert Image.open(out / "overlays" / "00000.png").width > Image.open(out / "overlays" / "00002.png").width
    assert Image.open(out / "grid.png").width > 2 * 32  # two columns: the samples of a prompt


def test_t2i_compbench_layout_names_files_as_its_scorers_parse_them(tmp):
    out = tmp / "compbench"
    prompts = tmp / "color_val.txt"
    prompts.write_text("a green bench and a red car\na blue bird\n")
    sample(tmp, *FAST, "--prompts", str(prompts), "--out", str(out), "--config.sample.layout=t2i-compbench",
           "--config.sample.n_per_prompt=2", "--config.sample.batch_size=3")
    names = sorted((out / "samples").iterdir(), key=lambda p: int(p.name.split("_")[-1].split(".")[0]))
    assert [p.name for p in names] == ["a green bench and a red car_000000.png", "a green bench and a red car_000001.png",
                                       "a blue bird_000002.png", "a blue bird_000003.png"]
    assert [p.name.split("_")[0] for p in names] == ["a green bench and a red car"] * 2 + ["a blue bird"] * 2
    # Batches of 3, the last padded with copies: the copies are not written.


def test_geneval_layout_writes_metadata_rows_as_given(tmp):
    out = tmp / "geneval"
    rows = [{"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
             "prompt": "a photo of a cat and a dog"},
            {"tag": "single_object", "include": [{"class": "apple", "count": 1}], "prompt": "a photo of an apple"}]
    file = tmp / "evaluation_metadata.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sample(tmp, *FAST, "--prompts", str(file), "--out", str(out), "--config.sample.layout=geneval",
           "--config.sample.n_per_prompt=2", "--config.sample.batch_size=4")
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "prompts.jsonl"]
    for i, row in enumerate(rows):
        folder = out / f"{i:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "metadata.jsonl", "samples"]
        assert json.loads((folder / "metadata.jsonl").read_text()) == row  # GenEval reads it with json.load
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]


def test_sweep_prints_its_table_writes_sweep_json_and_compiles_once(tmp):
    out = tmp / "sweep"
    file = tmp / "val.jsonl"
    file.write_text(json.dumps({"prompt": "a cat and a dog", "subjects": ["cat", "dog"]}) + "\n"
                    + json.dumps({"prompt": "a red apple", "subjects": ["apple"]}) + "\n")
    proc = sample(tmp, *FAST, "--config.sample.num_inference_steps=3", "--prompts", str(file), "--out", str(out),
                  "--sweep-steps", "0,2", "--config.sample.iterref.n_iters=2", "--config.sample.iterref.lr=0.5")
    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:3] == ["k", "timestep", "mean"])
    body = [line.split() for line in table[header + 1:header + 4]]
    assert [r[0] for r in body] == ["base", "0", "2"]
    assert [r[-1] for r in body] == ["1", "1", "0"]  # k = 2 reuses the program compiled for k = 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["scorer"] == "ctcal_jax.scorers:subject_attention" and result["seeds"] == [0]
    base, k0, k2 = result["rows"]
    assert k0["timestep"] > k2["timestep"] and base["timestep"] is None
    for r in (base, k0, k2):
        assert len(r["per_prompt"]) == 2 and all(0.0 <= v <= 1.0 for v in r["per_prompt"])
    assert k0["per_prompt"] != base["per_prompt"]  # IterRef changed the images


def test_taca_on_tiny_sd3(tmp):
    out = tmp / "taca"
    proc = sample(tmp, "--config.sample.num_inference_steps=2", "--prompt", "a cat", "--taca", "--out", str(out),
                  config=str(ROOT / "configs" / "sd35_taca.py") + ":runlocal")
    assert "wrote 1 images" in proc.stdout
    settings = json.loads((out / "prompts.jsonl").read_text())["settings"]
    assert settings["taca"] == {"gamma": 1.2, "t_threshold": 970.0, "cond_only": False}
    assert settings["scheduler"] == "flow_euler" and settings["guidance_scale"] == 7.0


@pytest.mark.parametrize("args, message", [
    (["--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
    (["--prompts", "empty.txt"], "no prompts"),
    (["--prompt", "a cat", "--config.sample.layout=coco"], "sample.layout='coco'"),
    (["--prompt", "a cat", "--iterref-step", "50"], "IterRef step index 50: expected 0..49"),
    (["--prompts", "no_prompt.jsonl"], "no_prompt.jsonl line 2: expected a JSON object with a \"prompt\""),
], ids=["missing-file", "empty", "layout", "iterref-step", "jsonl-row"])
def test_bad_input_is_one_line_and_status_1(tmp, args, message):
    (tmp / "empty.txt").write_text("\n")
    (tmp / "no_prompt.jsonl").write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    proc = sample(tmp, *args, "--out", str(tmp / "bad"), check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp / "bad").exists()


def test_resume_check_ignores_sample_settings(tmp_path):
    from ctcal_jax.train import check_config_json

    saved = {"lora": {"rank": 4}, "sample": {"seed": 0, "iterref": {"lr": 0.01}}, "total_steps": 10}
    check_config_json(tmp_path, saved, resuming=False)
    check_config_json(tmp_path, {**saved, "sample": {"seed": 3, "iterref": {"lr": 0.5}}}, resuming=True)
    with pytest.raises(ValueError, match="lora.rank"):
        check_config_json(tmp_path, {**saved, "lora": {"rank": 8}}, resuming=True)
    # A key added to the config after the run started: its default resumes, another value does not.
    check_config_json(tmp_path, {**saved, "flow": {"guidance": 3.5}}, resuming=True)
    with pytest.raises(ValueError, match="flow.guidance"):
        check_config_json(tmp_path, {**saved, "flow": {"guidance": 5.0}}, resuming=True)
