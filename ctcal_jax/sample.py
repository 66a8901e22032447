r"""The sampler: `python -m ctcal_jax.sample --config configs/NAME.py --prompt "..." --out DIR`.

    python -m ctcal_jax.sample --config configs/NAME.py [--config.key=value ...] \
        (--prompt "..." [--prompt ...] | --prompts FILE) [--taca] [--iterref-step K] --out DIR
    python -m ctcal_jax.sample --config ... --prompts FILE --sweep-steps 0,2,4,8 \
        [--scorer module:function] --out DIR

The model is the config's `model.pretrained` (SD 1.x/2.x, SD3/3.5 or FLUX.1, e.g.
`--config.model.pretrained=black-forest-labs/FLUX.1-dev`); every sampling setting is under `sample.*`
(`ctcal_jax/config.py`), e.g. `--config.sample.lora=runs/x/lora` for a training run's adapters.
`sample.num_inference_steps` and `sample.guidance_scale` 0 (the base config's) take the pipeline's
defaults (`sampling.generate`'s: FLUX.1 28 steps and embedded guidance 3.5, as FluxPipeline).
Prompts: `--prompt` (repeatable), or a file: `.jsonl` (one JSON object per line with a "prompt";
an optional "subjects" list of words names the prompt's subjects; GenEval's metadata rows as they
are), anything else one prompt per line (text after a tab ignored, as T2I-CompBench's scripts read
their prompt files). Sample j of every prompt uses seed `sample.seed + j`, as GenEval's and
T2I-CompBench's generation scripts reseed per prompt; a sample does not depend on its batch.

`sample.layout` decides the files (images PNG, written atomically):
- plain: `DIR/{i:05d}.png` (i over prompts, then their samples), `DIR/grid.png`.
- t2i-compbench: `DIR/samples/{prompt}_{idx:06d}.png`, idx counting every image, the form
  T2I-CompBench's scorers read (the prompt is `name.split("_")[0]`, the order `int(name.split("_")[-1])`):
  a prompt holding "_" or "/" is refused.
- geneval: `DIR/{index:05d}/metadata.jsonl` (the prompt's row as given: GenEval's evaluator reads
  `tag`, `include`, ...), `DIR/{index:05d}/samples/{j:04d}.png`, `DIR/{index:05d}/grid.png`.
Every layout also writes `DIR/prompts.jsonl` (per image: file, prompt, seed and the settings), and
with `sample.overlays` `DIR/overlays/{i:05d}.png`: each subject's map (the conditional attention
averaged over the steps, processed as IterRef's) over the image, the subject under its tile.

`--taca`: TACA (SPEC §4) with `taca.gamma` / `taca.t_threshold` (SD3/3.5, FLUX.1). `--iterref-step K`:
IterRef (SPEC §6) at step index K with `sample.iterref.*`; subjects from the prompt file or the
`sample.tagger`. `--sweep-steps`: IterRef at each step index over the prompts (same seeds) and the
plain baseline, scored by `--scorer` (default: `scorers.subject_attention`); prints a table and
writes `DIR/sweep.json`. The step index is an argument of the compiled program: the first candidate
compiles it, the others reuse it (the table's `compiles` column shows it; a batch whose prompts
have more than 4 subjects has another shape and compiles once more).

Bad input (a missing prompt file, no prompt, an unknown layout, a step index out of range, a JSON
line without "prompt", ...) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ctcal_jax import cli, nouns, sampling, scorers
from ctcal_jax.atomic import atomic_write
from ctcal_jax.attention import TACA
from ctcal_jax.iterref import IterRef
from ctcal_jax.viz import image_grid, save_png

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/NAME.py file (its get_config()).", lock_config=True)
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts", None, "A prompt file: .jsonl with a \"prompt\" per row, or one prompt per line.")
flags.DEFINE_bool("taca", False, "TACA with config.taca.gamma / t_threshold (SD3/3.5, FLUX.1).")
flags.DEFINE_integer("iterref-step", None, "IterRef at this step index (0-based), with config.sample.iterref.")
flags.DEFINE_string("out", None, "The output folder.")
flags.DEFINE_string("sweep-steps", None, "Comma-separated IterRef step indices to compare (writes sweep.json).")
flags.DEFINE_string("scorer", None, "module:function scoring (images [B,H,W,3] in [0,1], prompts) -> [B].")

LAYOUTS = ("plain", "t2i-compbench", "geneval")


def read_prompts(prompts: list[str], file: str | None) -> list[dict[str, Any]]:
    """The prompt rows (each a dict with at least "prompt") from `--prompt`s or `--prompts FILE`."""
    if prompts and file:
        raise ValueError("give --prompt or --prompts, not both")
    if file is None:
        rows = [{"prompt": p} for p in prompts]
    else:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {file}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".jsonl":
            rows = [_json_row(line, f"{file} line {n}") for n, line in enumerate(lines, 1) if line.strip()]
        else:
            rows = [{"prompt": p} for p in (line.split("\t")[0].strip() for line in lines) if p]
    if not rows:
        raise ValueError(f"no prompts: {'--prompts ' + file + ' holds none' if file else 'give --prompt or --prompts'}")
    for n, row in enumerate(rows):
        if not row["prompt"].strip():
            raise ValueError(f"prompt {n} is empty")
    return rows


def _json_row(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\" string")
    subjects = row.get("subjects")
    if subjects is not None and not (isinstance(subjects, list) and all(isinstance(w, str) for w in subjects)):
        raise ValueError(f"{where}: \"subjects\" must be a list of words")
    return row


def check(s: Any, rows: list[dict[str, Any]], iterref_step: int | None, sweep: list[int] | None,
          scorer: str | None = None) -> None:
    """Settings that would fail late (after loading the model), checked first."""
    if s.layout not in LAYOUTS:
        raise ValueError(f"sample.layout={s.layout!r}: expected one of {', '.join(LAYOUTS)}")
    for key in ("n_per_prompt", "batch_size"):
        if s[key] < 1:
            raise ValueError(f"sample.{key}={s[key]}: expected at least 1")
    if s.num_inference_steps < 0 or s.guidance_scale < 0:
        key = "num_inference_steps" if s.num_inference_steps < 0 else "guidance_scale"
        raise ValueError(f"sample.{key}={s[key]}: expected at least 0 (0: the pipeline's default)")
    if s.num_inference_steps:  # else checked once the pipeline (its default) is known: `check_steps`
        check_steps(s.num_inference_steps, iterref_step, sweep)
    if scorer and sweep is None:
        raise ValueError("--scorer scores a sweep: give --sweep-steps too")
    if iterref_step is not None and sweep is not None:
        raise ValueError("--iterref-step and --sweep-steps exclude each other (the sweep runs every step given)")
    if s.layout == "t2i-compbench":
        for n_row, row in enumerate(rows):
            bad = [c for c in "_/" if c in row["prompt"]]
            if bad:
                raise ValueError(f"prompt {n_row} {row['prompt']!r} holds {bad[0]!r}: T2I-CompBench's scorers read "
                                 f"the prompt back as the file name's part before the first '_'")
            if len((row["prompt"] + "_000000.png").encode()) > 255:
                raise ValueError(f"prompt {n_row} is too long for a file name (T2I-CompBench names files by prompt)")


def check_steps(n: int, iterref_step: int | None, sweep: list[int] | None) -> None:
    """IterRef's step indices against the `n` inference steps."""
    for k in ([iterref_step] if iterref_step is not None else []) + (sweep or []):
        if not 0 <= k < n:
            raise ValueError(f"IterRef step index {k}: expected 0..{n - 1} (sample.num_inference_steps={n})")


def parse_steps(arg: str) -> list[int]:
    try:
        steps = [int(k) for k in arg.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--sweep-steps {arg!r}: expected comma-separated step indices, e.g. 0,2,4,8") from None
    if not steps:
        raise ValueError("--sweep-steps: no step index given")
    return steps


def subject_words(row: dict[str, Any], tagger: Any) -> list[str]:
    """The row's subjects as words of its prompt: its "subjects", else the tagger's nouns (SPEC §5)."""
    prompt = row["prompt"]
    if row.get("subjects") is not None:
        spans = nouns.given_spans(prompt, row["subjects"])
    else:
        spans = nouns.select_spans(nouns.tag(prompt, tagger), prompt=prompt)
    return [prompt[a:b] for a, b in spans]


class Sampler:
    """One loaded pipeline and the config's settings; `run` yields batches of generated images."""

    def __init__(self, config: Any, rows: list[dict[str, Any]], taca: bool):
        self.s = config.sample
        self.rows = rows
        tagger = self.s.tagger
        self.tagger = tagger if tagger == "stanza" else cli.import_function(tagger, "sample.tagger")
        self.pipe = sampling.load_pipeline(config.model.pretrained)
        family = self.pipe.family
        # 0: the pipeline's defaults (`sampling.generate`'s)
        self.steps = self.s.num_inference_steps or sampling.DEFAULT_STEPS[family]
        self.guidance = self.s.guidance_scale or sampling.DEFAULT_GUIDANCE[family]
        self.taca = TACA(gamma=config.taca.gamma, t_threshold=config.taca.t_threshold) if taca else None
        if taca and family == "sd2":
            raise ValueError(f"--taca applies to MM-DiT pipelines (SD3/3.5, FLUX.1); {config.model.pretrained} is "
                             f"{family}")
        if self.s.true_cfg_scale != 1.0 and family != "flux":
            raise ValueError(f"sample.true_cfg_scale applies to FLUX.1 pipelines; {config.model.pretrained} is "
                             f"{family} (use sample.guidance_scale)")
        if self.s.lora:
            from conversion import import_lora  # reads files (tests/test_layering.py)

            self.lora = import_lora(self.s.lora, params=self.pipe.params)
        else:
            self.lora = None
        self._words: dict[int, list[str]] = {}
        # (prompt index, sample j, seed), prompts first: the plain layout's image order.
        self.jobs = [(p, j, self.s.seed + j) for p in range(len(rows)) for j in range(self.s.n_per_prompt)]

    def words(self, p: int) -> list[str]:
        if p not in self._words:
            self._words[p] = subject_words(self.rows[p], self.tagger)
        return self._words[p]

    def iterref(self, step: int, batch: list[tuple[int, int, int]]) -> IterRef:
        ir = self.s.iterref
        gsn = (ir.gsn_start, ir.gsn_end) if ir.gsn_end > ir.gsn_start else None
        return IterRef(step=step, lr=ir.lr, n_iters=ir.n_iters, loss=ir.loss, gsn_steps=gsn, gsn_lr=ir.gsn_lr,
                       subjects=[self.words(p) for p, _, _ in batch])

    def run(self, iterref_step: int | None = None, attn: bool = False, progress: Any = None
            ) -> Iterator[tuple[list[tuple[int, int, int]], dict[str, Any]]]:
        """Per batch: its jobs and `generate`'s output as numpy. A short last batch is padded with
        copies of its last job (their outputs dropped), so every batch runs the same program."""
        size = self.s.batch_size
        for start in range(0, len(self.jobs), size):
            jobs = self.jobs[start:start + size]
            padded = jobs + [jobs[-1]] * (size - len(jobs)) if len(self.jobs) > size else jobs
            out = sampling.generate(
                self.pipe, [self.rows[p]["prompt"] for p, _, _ in padded],
                num_inference_steps=self.steps, guidance_scale=self.guidance, true_cfg_scale=self.s.true_cfg_scale,
                scheduler=self.s.scheduler or None, seed=[seed for _, _, seed in padded],
                negative_prompts=self.s.negative_prompt, taca=self.taca,
                iterref=None if iterref_step is None else self.iterref(iterref_step, padded), lora=self.lora,
                height=self.s.height or None, width=self.s.width or None, taca_cond_only=self.s.taca_cond_only,
                return_attn=attn)
            out = {k: np.asarray(v) for k, v in out.items()}
            if progress is not None:
                progress.advance(len(jobs))
            yield jobs, out

    def settings(self, iterref_step: int | None) -> dict[str, Any]:
        """What made the images (prompts.jsonl)."""
        s = self.s
        flux = {"true_cfg_scale": s.true_cfg_scale} if self.pipe.family == "flux" else {}
        return {"model": self.pipe.source, "scheduler": s.scheduler or sampling.DEFAULT_SCHEDULER[self.pipe.family],
                "num_inference_steps": self.steps, "guidance_scale": self.guidance, **flux,
                "negative_prompt": s.negative_prompt, "height": s.height or None, "width": s.width or None,
                "lora": s.lora or None, "taca": None if self.taca is None else
                {"gamma": self.taca.gamma, "t_threshold": self.taca.t_threshold, "cond_only": s.taca_cond_only},
                "iterref": None if iterref_step is None else {"step": iterref_step, **s.iterref.to_dict()}}


def image_path(layout: str, out: Path, i: int, row: dict[str, Any], p: int, j: int) -> Path:
    """Where image i (prompt p's sample j) goes in `layout` (module docstring)."""
    if layout == "plain":
        return out / f"{i:05d}.png"
    if layout == "t2i-compbench":
        return out / "samples" / f"{row['prompt']}_{i:06d}.png"
    return out / f"{p:05d}" / "samples" / f"{j:04d}.png"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _progress(total: int) -> Any:
    """A progress bar over images on a terminal (`metrics.Progress`), imported late: metrics pulls in
    tensorboardX and torch (seconds), which a bad command line should not wait for."""
    from ctcal_jax.metrics import Progress

    return Progress(total, unit="image")


def generate_files(sampler: Sampler, out: Path, iterref_step: int | None) -> int:
    """Sample every prompt into `out` in the configured layout; returns the number of images."""
    s = sampler.s
    settings = sampler.settings(iterref_step)
    records, images, i = [], [], 0
    progress = _progress(len(sampler.jobs))
    try:
        for jobs, batch in sampler.run(iterref_step, attn=s.overlays, progress=progress):
            for b, (p, j, seed) in enumerate(jobs):
                row = sampler.rows[p]
                file = image_path(s.layout, out, i, row, p, j)
                save_png(batch["images"][b], file)
                records.append({"file": str(file.relative_to(out)), "prompt": row["prompt"], "index": p,
                                "sample": j, "seed": seed, "settings": settings})
                if s.overlays:
                    save_png(_overlay(sampler, batch["attn"][b:b + 1], batch["images"][b], p), out / "overlays" /
                             f"{i:05d}.png")
                if s.layout != "t2i-compbench":
                    images.append(batch["images"][b])
                i += 1
    finally:
        progress.close()
    if s.layout == "plain":
        save_png(image_grid(np.stack(images), cols=s.n_per_prompt if s.n_per_prompt > 1 else
                            int(np.ceil(np.sqrt(len(images))))), out / "grid.png")
    elif s.layout == "geneval":
        n = s.n_per_prompt
        for p, row in enumerate(sampler.rows):
            with atomic_write(out / f"{p:05d}" / "metadata.jsonl") as f:
                f.write(json.dumps(row) + "\n")
            save_png(image_grid(np.stack(images[p * n:(p + 1) * n]), cols=min(n, 4)), out / f"{p:05d}" / "grid.png")
    write_jsonl(out / "prompts.jsonl", records)
    return i


def _overlay(sampler: Sampler, attn: np.ndarray, image: np.ndarray, p: int) -> Any:
    """Prompt p's subject-map figure from one sample's step-averaged maps `[1, h, w, T]`."""
    return scorers.overlay_figure(sampler.pipe, sampler.rows[p]["prompt"], sampler.words(p), attn, image)


def sweep(sampler: Sampler, steps: list[int], scorer_spec: str | None, out: Path) -> list[dict[str, Any]]:
    """IterRef at each step index of `steps` and the plain baseline over the same jobs, scored;
    prints the table and writes `out/sweep.json`. Returns the table's rows."""
    if scorer_spec:
        scorer, name = cli.import_function(scorer_spec, "--scorer"), scorer_spec
    else:
        subjects = {row["prompt"]: sampler.words(p) for p, row in enumerate(sampler.rows)}
        scorer = scorers.subject_attention(sampler.pipe, subjects=subjects, tagger=sampler.tagger,
                                           guidance=sampler.guidance if sampler.pipe.family == "flux" else None)
        name = "ctcal_jax.scorers:subject_attention"
    n_prompts, n = len(sampler.rows), sampler.s.n_per_prompt
    progress = _progress(len(sampler.jobs) * (1 + len(steps)))
    table, baseline = [], None
    try:
        for k in [None] + steps:
            before = sampling.compiled_programs(sampler.pipe)
            scores, timesteps = [], None
            for jobs, batch in sampler.run(k, progress=progress):
                prompts = [sampler.rows[p]["prompt"] for p, _, _ in jobs]
                got = np.asarray(scorer(batch["images"][:len(jobs)], prompts), np.float64).reshape(-1)
                if got.shape != (len(jobs),):
                    raise ValueError(f"scorer {name}: returned {got.shape[0]} scores for {len(jobs)} images")
                scores.append(got)
                timesteps = batch["timesteps"]
            per_prompt = np.concatenate(scores).reshape(n_prompts, n).mean(axis=1)
            baseline = per_prompt if k is None else baseline
            table.append({"k": k, "timestep": None if k is None else float(timesteps[k]),
                          "mean": float(per_prompt.mean()), "std": float(per_prompt.std()),
                          "min": float(per_prompt.min()), "max": float(per_prompt.max()),
                          "better": None if k is None else int((per_prompt > baseline).sum()),
                          "compiles": sampling.compiled_programs(sampler.pipe) - before,
                          "per_prompt": per_prompt.tolist()})
    finally:
        progress.close()
    print(format_table(table, name, n_prompts, n))
    result = {"scorer": name, "prompts": [r["prompt"] for r in sampler.rows],
              "seeds": [sampler.s.seed + j for j in range(n)], "settings": sampler.settings(None),
              "iterref": sampler.s.iterref.to_dict(), "rows": table}
    with atomic_write(out / "sweep.json") as f:
        f.write(json.dumps(result, indent=2))
    return table


def format_table(table: list[dict[str, Any]], scorer: str, n_prompts: int, n_per_prompt: int) -> str:
    """The sweep's table: one row per candidate (the baseline first); mean, spread over prompts of each
    prompt's mean score, prompts scoring above the baseline, and programs compiled for that row."""
    lines = [f"IterRef step sweep: {n_prompts} prompts x {n_per_prompt} samples, scorer {scorer}",
             f"{'k':>5} {'timestep':>9} {'mean':>8} {'std':>8} {'min':>8} {'max':>8} {'better':>7} {'compiles':>8}"]
    for r in table:
        k = "base" if r["k"] is None else str(r["k"])
        t = "-" if r["timestep"] is None else f"{r['timestep']:.1f}"
        better = "-" if r["better"] is None else f"{r['better']}/{n_prompts}"
        lines.append(f"{k:>5} {t:>9} {r['mean']:8.4f} {r['std']:8.4f} {r['min']:8.4f} {r['max']:8.4f} "
                     f"{better:>7} {r['compiles']:>8}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = FLAGS.config
        rows = read_prompts(FLAGS.prompt, FLAGS.prompts)
        steps = parse_steps(FLAGS["sweep-steps"].value) if FLAGS["sweep-steps"].value is not None else None
        check(config.sample, rows, FLAGS["iterref-step"].value, steps, FLAGS.scorer)
        out = Path(FLAGS.out)
        sampler = Sampler(config, rows, FLAGS.taca)
        check_steps(sampler.steps, FLAGS["iterref-step"].value, steps)
        if steps is not None:
            sweep(sampler, steps, FLAGS.scorer, out)
            print(f"wrote {out / 'sweep.json'}")
        else:
            n = generate_files(sampler, out, FLAGS["iterref-step"].value)
            print(f"wrote {n} images to {out} ({config.sample.layout} layout)")
    except (ValueError, OSError) as e:  # bad input, a missing file, an output path that is a file
        sys.exit(f"error: {' '.join(str(e).split())}")


def run() -> None:
    """Entry point: parse flags (a bad `--config` is a one-line error), then sample."""
    argv = cli.parse_flags(sys.argv, ["config", "out"])
    app.run(main, argv=argv, flags_parser=lambda a: a)


if __name__ == "__main__":
    run()
