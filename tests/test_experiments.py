"""The shapes-world experiment (`python -m ctcal_jax.experiments.shapes`): its measurements on known
inputs, the fine-tunes' configs, and a two-prompts-per-category run of the base that writes its rows
and table, resumes, and refuses a directory made with other settings. The full experiment (every
method × 3 seeds, about an hour on 2 cores) is what the README's table comes from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conversion.pipeline import resolve
from ctcal_jax import config as config_lib
from ctcal_jax.data import shapes, shapes_eval
from ctcal_jax.data.imagefolder import ImageFolderSource
from ctcal_jax.experiments import shapes as experiment
from ctcal_jax.sampling import load_pipeline

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
# 2 prompts per category and 8 GORS rows: one batch shape, one sampling program.
TINY = experiment.Settings(steps=3, n=2, gors_rows=8, num_inference_steps=2, guidance_scale=5.0)


def demo_config():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(resolve("builtin:shapes-sd2"))


def test_mask_iou_pools_the_mask_to_the_map():
    mask = np.zeros((32, 32), bool)
    mask[0:8, 0:8] = True  # 4×4 cells of a 16×16 map
    exact = np.zeros((16, 16), bool)
    exact[0:4, 0:4] = True
    assert experiment.mask_iou(exact, mask) == 1.0
    half = np.zeros((16, 16), bool)
    half[0:4, 0:2] = True
    assert experiment.mask_iou(half, mask) == 0.5
    assert experiment.mask_iou(~exact, mask) == 0.0


def test_reward_is_the_share_of_checks_passed():
    scene = shapes.prompt_set("relation", n=1)[0]
    image, _ = shapes.render(scene)
    assert experiment.reward(shapes_eval.evaluate(image, scene)) == 1.0
    blank = np.full_like(image, shapes.BACKGROUND)
    assert experiment.reward(shapes_eval.evaluate(blank, scene)) == 0.0
    one = shapes.Scene(scene.objects[:1], None, scene.prompt, scene.nouns, scene.category, scene.size)
    assert experiment.reward(shapes_eval.evaluate(shapes.render(one)[0], scene)) == pytest.approx(1 / 3)


def test_the_fine_tunes_share_everything_but_objective_and_data(tmp_path):
    configs = {m: experiment.train_config(demo_config(), m, 7, TINY, tmp_path) for m in experiment.TRAINED}
    for c in configs.values():
        config_lib.check(c)
        assert (c.seed, c.total_steps, c.eval.every) == (7, 3, 0)
    assert [configs[m].objective for m in ("diffusion", "gors", "ctcal")] == ["diffusion", "diffusion", "ctcal"]
    assert configs["gors"].data.kind == "imagefolder" and configs["ctcal"].data.kind == "shapes"
    same = {k: v for k, v in configs["ctcal"].items() if k not in ("objective", "data")}
    assert {k: v for k, v in configs["diffusion"].items() if k not in ("objective", "data")} == same
    # Each Table-4 ablation is CTCAL with one switch off.
    for method, switch in experiment.ABLATIONS.items():
        changed = {k for k in configs["ctcal"].ctcal if configs[method].ctcal[k] != configs["ctcal"].ctcal[k]}
        assert changed == {switch} and configs[method].objective == "ctcal", method
    assert configs["ctcal-alltokens"].ctcal.tokens == "all" and not configs["ctcal-pixel"].ctcal.semantic
    with pytest.raises(ValueError, match="not trained"):
        experiment.train_config(demo_config(), "base", 0, TINY, tmp_path)


def test_gors_data_is_an_image_folder_of_scored_samples(pipe, tmp_path):
    stats = experiment.gors_data(pipe, tmp_path / "gors", TINY)
    rows = [json.loads(line) for line in (tmp_path / "gors" / "metadata.jsonl").read_text().splitlines()]
    assert stats["gors_rows"] == len(rows) <= TINY.gors_rows
    assert all(experiment.GORS_MIN_REWARD <= r["reward"] <= 1 for r in rows)
    if rows:
        source = ImageFolderSource(tmp_path / "gors", pipe.encoders, resolution=32)
        assert float(source[0]["reward"]) == rows[0]["reward"]


def test_the_base_row_table_resume_and_settings_check(tmp_path):
    out = tmp_path / "exp"
    rows = experiment.run(demo_config(), out, [0], ["base"], TINY)
    (row,) = rows
    assert row["method"] == "base" and row["settings"]["n"] == 2
    assert set(row) >= {f"acc/{c}" for c in (*shapes.CATEGORIES, "all", "held_out")} | {"iou/t100", "iou/t800"}
    assert all(0 <= row[k] <= 1 for k in row if k.startswith(("acc/", "iou/")))
    assert "| base | 1 |" in (out / "table.md").read_text()
    assert (out / "figures" / "maps_base-0.png").exists()
    assert experiment.run(demo_config(), out, [0], ["base"], TINY) == rows  # resumed: nothing new to run
    with pytest.raises(ValueError, match="results.jsonl: made with other settings"):
        experiment.run(demo_config(), out, [0], ["base"], experiment.Settings(3, 1, 8, 2, 5.0))
    with pytest.raises(ValueError, match="unknown"):
        experiment.run(demo_config(), out, [0], ["gors", "dreambooth"], TINY)
