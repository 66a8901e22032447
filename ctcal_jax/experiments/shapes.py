r"""The shapes-world experiment: what CTCAL, GORS, IterRef and TACA change, measured exactly on a CPU.

    python -m ctcal_jax.experiments.shapes --out out/shapes_experiment [--seeds 0,1,2] [--steps 300]
        [--n 16] [--methods base,diffusion,gors,ctcal,iterref,base-sd3,taca]

Every method starts from a shipped base (`builtin:shapes-sd2`, the UNet; `builtin:shapes-sd3`, the
MM-DiT) and is measured on the same held-out test prompts (`shapes.prompt_set(category, "test")`:
every other prompt uses a colour–shape pair or a relation layout that training never shows) with the
same sampler (25 DDIM / flow-matching Euler steps, CFG 5) and, for seed s, the same initial noise:

- `base`: the shapes-sd2 base as shipped.
- `diffusion`, `gors`, `ctcal`: LoRA fine-tunes of it through the trainer (`train.train` with
  `configs/demo.py`'s model, LoRA and learning rates; `--steps` steps of 16, training seed s). The
  diffusion-only baseline trains on rendered scenes with the plain loss; GORS (T2I-CompBench) on the
  base's own samples of training prompts, each weighted by the evaluator's reward (the share of the
  prompt's objects present, and its relation), rows with reward < `GORS_MIN_REWARD` dropped; CTCAL
  on rendered scenes with SPEC §3's objective.
- `ctcal-pixel`, `ctcal-noreg`, `ctcal-alltokens`, `ctcal-noadaptive`: CTCAL's Table-4 ablations
  (pixel alignment only, no subject-balance regulariser, every token instead of the nouns, no
  timestep weight λ_t), otherwise as `ctcal`; not in the default `--methods`.
- `iterref`: the base with IterRef (SPEC §6) at SD 1.4's step, k = 8 of 50, scaled to the sampler's
  steps (k = 4 of 25 DDIM steps, t = 801), with the config's `sample.iterref.*` (lr 1e-2, 50 Adam
  updates, CN + IoU); the subjects are the shape words.
- `base-sd3`, `taca`: the shapes-sd3 base without and with TACA (SPEC §4, `config.taca.*`).

Measured per (method, seed): (a) the exact evaluator's accuracy (`shapes_eval.score`'s `correct`) per
category, over all test prompts and over the held-out ones; (b) for the UNet methods, the IoU of
each noun's alignment map (SPEC §2's processing, `probe.noun_maps`, thresholded at 0.5) with its
object's ground-truth mask, on the rendered test scenes noised to `IOU_TIMESTEPS` (small and large t).

OUT holds `results.jsonl` (one row per method and seed; a killed run resumes and skips the rows it
has), `table.md` (mean ± standard deviation over seeds), `figures/maps_<method>-<seed>.png` (UNet
methods: the first test scene of each category with each noun's map at both timesteps),
`runs/<method>-<seed>/` (the trainer's work directories: `lora/`, metrics, checkpoints),
`gors_data/` (the GORS image folder) and `jax_cache/`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from ctcal_jax import probe, sampling, train, viz
from ctcal_jax.atomic import atomic_write
from ctcal_jax.attention import TACA
from ctcal_jax.data import shapes, shapes_eval
from ctcal_jax.data.examples import text_example
from ctcal_jax.families.common import latents
from ctcal_jax.iterref import IterRef

# CTCAL's Table-4 ablations: which `config.ctcal` switch each turns off.
ABLATIONS = {"ctcal-pixel": "semantic", "ctcal-noreg": "regularizer", "ctcal-alltokens": "tokens",
             "ctcal-noadaptive": "adaptive_weight"}
TRAINED = ("diffusion", "gors", "ctcal", *ABLATIONS)
METHODS = ("base", *TRAINED, "iterref", "base-sd3", "taca")
SD3_METHODS = ("base-sd3", "taca")
ITERREF_STEP = 8 / 50  # SPEC §6, SD 1.4: step index 8 of 50
IOU_TIMESTEPS = (100, 800)
IOU_THRESHOLD = 0.5
GORS_MIN_REWARD = 0.5
GORS_SEED = 10_000  # the GORS samples' noise seeds start here, away from the evaluation seeds

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory (created; a second call resumes).")
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (training and sampling).")
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ABLATIONS)
flags.DEFINE_string("methods", ",".join(DEFAULT_METHODS), f"Comma-separated subset of {','.join(METHODS)}.")
flags.DEFINE_integer("steps", 300, "Fine-tuning steps of 16 images (diffusion, gors, ctcal).")
flags.DEFINE_integer("n", 16, "Test prompts per category.")
flags.DEFINE_integer("gors_rows", 256, "Training prompts the base samples for GORS.")
flags.DEFINE_integer("num_inference_steps", 25, "Sampling steps of every evaluation.")
flags.DEFINE_float("guidance_scale", 5.0, "CFG scale of every evaluation.")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row of one experiment shares (stored with each row; a resumed run must match)."""

    steps: int
    n: int
    gors_rows: int
    num_inference_steps: int
    guidance_scale: float


def train_config(config: ml_collections.ConfigDict, method: str, seed: int, settings: Settings, out: Path
                 ) -> ml_collections.ConfigDict:
    """The trainer config of one fine-tune: `config` with the method's objective, data, seed and steps."""
    c = config.copy_and_resolve_references()
    c.seed = seed
    c.total_steps = settings.steps
    c.checkpoint_every = settings.steps
    c.eval.every = 0
    c.sample_every = 0
    c.compilation_cache_dir = str(out / "jax_cache")  # seeds after the first reuse the compiled step
    if method == "ctcal":
        c.objective = "ctcal"
    elif method in ABLATIONS:
        c.objective = "ctcal"
        switch = ABLATIONS[method]
        if switch == "tokens":
            c.ctcal.tokens = "all"
        else:
            c.ctcal[switch] = False
    elif method == "diffusion":
        c.objective = "diffusion"
    elif method == "gors":
        c.objective = "diffusion"  # reward-weighted: the image folder's rows carry rewards
        c.data.kind = "imagefolder"
        c.data.path = str(out / "gors_data")
    else:
        raise ValueError(f"{method!r} is not trained (trained methods: {TRAINED})")
    return c


def reward(result: dict[str, Any]) -> float:
    """GORS's weight of one sample: the share of the prompt's checks it passes (each object present,
    and the relation when the prompt has one)."""
    checks = list(result["present"]) + ([] if result["relation"] is None else [result["relation"]])
    return float(np.mean(checks))


def gors_data(pipe: Any, folder: Path, settings: Settings) -> dict[str, float]:
    """The base's samples of `gors_rows` training prompts, scored, written as an image folder with
    rewards (rows below `GORS_MIN_REWARD` dropped); kept if already there. Returns its statistics."""
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        source = shapes.ShapesSource(pipe.encoders, split="train", rows=settings.gors_rows)
        scenes = [source.scene(i) for i in range(settings.gors_rows)]
        images = generate(pipe, [s.prompt for s in scenes], settings, seed=GORS_SEED)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (scene, image) in enumerate(zip(scenes, images)):
            r = reward(shapes_eval.evaluate(image, scene))
            if r >= GORS_MIN_REWARD:
                viz.save_png(image, folder / f"{i:05d}.png")
                rows.append({"file_name": f"{i:05d}.png", "text": scene.prompt, "nouns": list(scene.nouns), "reward": r})
        with atomic_write(meta) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line]
    return {"gors_rows": len(rows), "gors_mean_reward": float(np.mean([r["reward"] for r in rows]))}


def generate(pipe: Any, prompts: list[str], settings: Settings, seed: int, **kwargs: Any) -> np.ndarray:
    """uint8 `[B, R, R, 3]` samples at the world's resolution (the sampler's settings, seeds `seed + b`)."""
    out = sampling.generate(pipe, prompts, num_inference_steps=settings.num_inference_steps,
                            guidance_scale=settings.guidance_scale, seed=seed, height=32, width=32, **kwargs)
    return np.round(np.asarray(out["images"]) * 255).astype(np.uint8)


def accuracy(images: np.ndarray, scenes: Sequence[shapes.Scene]) -> dict[str, float]:
    """`acc/<category>`, `acc/all` (the mean over categories) and `acc/held_out` (prompts with a
    held-out pair or layout; absent when there is none), each the share of prompts judged correct."""
    correct = np.array([shapes_eval.evaluate(image, s)["correct"] for image, s in zip(images, scenes)])
    categories = np.array([s.category for s in scenes])
    out = {f"acc/{c}": float(correct[categories == c].mean()) for c in shapes.CATEGORIES}
    out["acc/all"] = float(np.mean([out[f"acc/{c}"] for c in shapes.CATEGORIES]))
    held_out = [shapes.is_held_out(s) for s in scenes]
    if any(held_out):
        out["acc/held_out"] = float(correct[held_out].mean())
    return out


class MapIoU:
    """IoU of each noun's alignment map with its object's mask, on the rendered test scenes at the
    timesteps `IOU_TIMESTEPS` (the module docstring's (b)), and a figure of those maps; compiled
    once per pipeline."""

    def __init__(self, config: ml_collections.ConfigDict, pipe: Any, scenes: Sequence[shapes.Scene]):
        self.pipe, self.scenes = pipe, list(scenes)
        rendered = [shapes.render(s) for s in self.scenes]
        examples = [text_example(pipe.encoders, s.prompt, s.nouns, max_nouns=config.data.max_nouns) for s in self.scenes]
        self.batch = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *examples)
        self.images = np.stack([img for img, _ in rendered])
        self.batch["images"] = jnp.asarray(self.images, jnp.float32) / 127.5 - 1
        self.masks = [m for _, m in rendered]

        @jax.jit
        def maps(frozen, trainable, batch, t):
            batch = {**batch, "latents": latents(batch, frozen, pipe.vae, jax.random.key(config.seed))}
            return probe.noun_maps(config, pipe, frozen, trainable, batch, t)

        self._maps = maps

    def maps(self, adapters: dict[str, Any]) -> dict[int, np.ndarray]:
        """Per timestep of `IOU_TIMESTEPS`, every scene's noun maps `[B, h, w, N]` in [0, 1]."""
        return {t: np.asarray(self._maps(self.pipe.params, adapters, self.batch, jnp.float32(t))) for t in IOU_TIMESTEPS}

    def __call__(self, adapters: dict[str, Any]) -> dict[str, float]:
        out = {}
        for t, m in self.maps(adapters).items():
            ious = [mask_iou(m[i, ..., j] >= IOU_THRESHOLD, mask)
                    for i, masks in enumerate(self.masks) for j, mask in enumerate(masks)]
            out[f"iou/t{t}"] = float(np.mean(ious))
        return out

    def figure(self, adapters: dict[str, Any], title: str) -> Any:
        """The first test scene of each category: its render, then each noun's map at every timestep."""
        maps = self.maps(adapters)
        firsts = [next(i for i, s in enumerate(self.scenes) if s.category == c) for c in shapes.CATEGORIES]
        return viz.labelled_maps_figure([
            {"prompt": f"{title}: {self.scenes[i].prompt}", "image": self.images[i] / 255.0,
             "words": list(self.scenes[i].nouns),
             "rows": [(f"t={t}", m[i, ..., :len(self.scenes[i].nouns)]) for t, m in maps.items()]}
            for i in firsts], tile=128)


def mask_iou(predicted: np.ndarray, mask: np.ndarray) -> float:
    """IoU of a boolean map `[h, w]` with a boolean mask `[H, W]` average-pooled to `[h, w]` (≥ 0.5)."""
    f = mask.shape[0] // predicted.shape[0]
    pooled = mask.reshape(predicted.shape[0], f, predicted.shape[1], f).mean(axis=(1, 3)) >= 0.5
    union = np.logical_or(predicted, pooled).sum()
    return float(np.logical_and(predicted, pooled).sum() / union) if union else 1.0


def adapters_of(pipe: Any, workdir: Path) -> dict[str, Any]:
    """A finished fine-tune's adapters, read back from its diffusers-format export."""
    from conversion import import_lora  # the experiment is a program: it reads files

    return import_lora(workdir / "lora", params=pipe.params)


def summarise(rows: list[dict[str, Any]]) -> str:
    """`table.md`: per method, the mean ± standard deviation over seeds of every measurement."""
    keys = ["acc/single", "acc/binding", "acc/relation", "acc/three", "acc/all", "acc/held_out",
            *(f"iou/t{t}" for t in IOU_TIMESTEPS)]
    head = "| method | seeds | " + " | ".join(k.split("/")[1].replace("t", "IoU t=", 1) if k.startswith("iou")
                                            else k.split("/")[1] for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        cells = []
        for k in keys:
            values = [r[k] for r in mine if k in r]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "–")
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, out: Path, seeds: Sequence[int], methods: Sequence[str],
        settings: Settings) -> list[dict[str, Any]]:
    """Measure every (method, seed) not yet in `out/results.jsonl`; returns all rows. `config` is the
    fine-tunes' trainer config (`configs/demo.py`): its model is the UNet base."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected a subset of {METHODS}")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line] if results.exists() else []
    for r in rows:
        if r["settings"] != dataclasses.asdict(settings):
            raise ValueError(f"{results}: made with other settings ({r['settings']}); use another --out")
    done = {(r["method"], r["seed"]) for r in rows}
    scenes = [s for c in shapes.CATEGORIES for s in shapes.prompt_set(c, "test", n=settings.n)]
    prompts = [s.prompt for s in scenes]
    sd2 = sampling.load_pipeline(config.model.pretrained)
    sd3 = sampling.load_pipeline("builtin:shapes-sd3") if set(methods) & set(SD3_METHODS) else None
    iou = MapIoU(config, sd2, scenes)
    for method in METHODS:
        if method not in methods:
            continue
        for seed in seeds:
            if (method, seed) in done:
                continue
            tick = time.perf_counter()
            row: dict[str, Any] = {"method": method, "seed": seed}
            adapters: dict[str, Any] = {}
            if method in TRAINED:
                if method == "gors":
                    row.update(gors_data(sd2, out / "gors_data", settings))
                workdir = out / "runs" / f"{method}-{seed}"
                last = train.train(train_config(config, method, seed, settings, out), workdir)
                row["final_loss"] = last.get("loss")
                adapters = adapters_of(sd2, workdir)
            pipe = sd3 if method in SD3_METHODS else sd2
            extra: dict[str, Any] = {}
            if method == "iterref":
                ir = config.sample.iterref
                extra["iterref"] = IterRef(step=round(ITERREF_STEP * settings.num_inference_steps), lr=ir.lr, n_iters=ir.n_iters, loss=ir.loss,
                                           subjects=[s.nouns for s in scenes])
            if method == "taca":
                extra["taca"] = TACA(gamma=config.taca.gamma, t_threshold=config.taca.t_threshold)
            images = generate(pipe, prompts, settings, seed=seed * len(prompts), lora=adapters or None, **extra)
            row.update(accuracy(images, scenes))
            if pipe is sd2 and method != "iterref":
                row.update(iou(adapters))
            row.update(settings=dataclasses.asdict(settings), seconds=round(time.perf_counter() - tick, 1))
            logging.info("%s seed %d: %s", method, seed,
                         "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith(("acc/", "iou/"))))
            rows.append(row)
            with atomic_write(results) as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            with atomic_write(out / "table.md") as f:
                f.write(summarise(rows))
    for r in rows:  # also those of an earlier call
        figure = out / "figures" / f"maps_{r['method']}-{r['seed']}.png"
        if r["method"] in ("base", *TRAINED) and not figure.exists():
            adapters = adapters_of(sd2, out / "runs" / f"{r['method']}-{r['seed']}") if r["method"] in TRAINED else {}
            viz.save_png(iou.figure(adapters, f"{r['method']} (seed {r['seed']})"), figure)
    return rows


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(train.QuietOrbax())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    settings = Settings(steps=FLAGS.steps, n=FLAGS.n, gors_rows=FLAGS.gors_rows,
                        num_inference_steps=FLAGS.num_inference_steps, guidance_scale=FLAGS.guidance_scale)
    try:
        seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"error: --seeds={FLAGS.seeds!r}: expected comma-separated integers")
    try:
        rows = run(FLAGS.config, Path(FLAGS.out), seeds, [m.strip() for m in FLAGS.methods.split(",") if m.strip()], settings)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(summarise(rows), end="")


if __name__ == "__main__":
    flags.mark_flag_as_required("out")
    # `--config` is the trainer's flag (`ctcal_jax.train`): the fine-tunes' config, by default the demo's.
    FLAGS.set_default("config", "configs/demo.py")
    app.run(main)
