"""FLUX.1 prompt encoding and sampling against diffusers' `FluxPipeline` on `builtin:tiny-flux`.

The built-in tiny FLUX.1-dev pipeline (`conversion.tiny`: random weights, CLIP-L-like and T5 encoders,
16-channel VAE) is loaded twice: by diffusers' `FluxPipeline` (PyTorch, the reference) and by
`sampling.load_pipeline`. Both start from the same initial latents (ours NHWC, diffusers' packed 2×2
with `FluxPipeline._pack_latents`); diffusers' latents after every step (`callback_on_step_end`,
unpacked) are compared with ours (`return_trajectory=True`). TACA's reference is the same pipeline
with an explicit-softmax attention processor (`tests.test_flux.FluxProbsProcessor`) that scales the
image-query × text-key logits while the pipeline's current timestep is at or above the threshold.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conversion import tiny  # noqa: E402
from ctcal_jax import sampling, text  # noqa: E402
from ctcal_jax.attention import TACA  # noqa: E402
from tests.test_flux import FluxProbsProcessor  # noqa: E402
from tests.tiny import nchw, nhwc, randomize, rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 128, 96  # latents 16×12, 8×6 image tokens
PROMPTS = ["a red cat next to a blue car", "two green apples on a book"]
LONG = ", ".join(["a red apple next to a small blue boat on a calm lake"] * 40)  # > 77 CLIP and > 512 T5 tokens
STEPS = 4


@pytest.fixture(scope="module")
def flux():
    folder = tiny.materialize("tiny-flux")
    ref = diffusers.FluxPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    # One torch thread: beside XLA's CPU thread pool, torch's own threads make these tiny models'
    # forwards ~20× slower (~10 ms per small matmul on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield folder, ref, sampling.load_pipeline(folder)
    torch.set_num_threads(threads)


def pack(x_nhwc):
    """NHWC latents -> diffusers' packed `[B, N, 64]` tokens."""
    b, h, w, c = x_nhwc.shape
    return diffusers.FluxPipeline._pack_latents(torch.from_numpy(nchw(x_nhwc)).contiguous(), b, c, h, w)


def unpack(tokens):
    """diffusers' packed latents -> NHWC numpy."""
    return nhwc(diffusers.FluxPipeline._unpack_latents(tokens, HEIGHT, WIDTH, 8).numpy())


def run_diffusers(ref, x_nhwc, **kwargs):
    """diffusers' latents after every step `[N, B, h, w, C]` and its final latents (NHWC)."""
    steps = []

    def keep(pipe, i, t, kw):
        steps.append(unpack(kw["latents"]).copy())
        return kw

    with torch.no_grad():
        final = ref(latents=pack(x_nhwc), height=HEIGHT, width=WIDTH, output_type="latent",
                    callback_on_step_end=keep, **kwargs).images
    return np.stack(steps), unpack(final)


def noise(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, HEIGHT // 8, WIDTH // 8, 16)).astype(np.float32)


def test_encode_prompt_equals_diffusers(flux):
    """CLIP-L's pooled output (77 tokens) and T5's last hidden state (512 tokens; long prompts truncated
    by both tokenizers) equal `FluxPipeline.encode_prompt`; its text ids are the zeros our transformer
    uses by default."""
    _, ref, pipe = flux
    prompts = [*PROMPTS, "", LONG]
    with torch.no_grad():
        want, want_pooled, text_ids = ref.encode_prompt(prompts, prompt_2=None, device="cpu")
    assert pipe.encoders.family == "flux"
    assert pipe.encoders.max_lengths == {"text_encoder": 77, "text_encoder_2": 512}
    ours = jax.jit(lambda p, ids: text.encode_prompts(pipe.encoders, p, ids))(
        pipe.params, {c: t["input_ids"] for c, t in text.tokenize_prompts(pipe.encoders, prompts).items()})
    assert ours["prompt_embeds"].shape == tuple(want.shape) == (4, 512, 32)
    assert ours["pooled_prompt_embeds"].shape == tuple(want_pooled.shape) == (4, 32)
    assert rel_err(ours["prompt_embeds"], want.numpy()) <= 1e-5
    assert rel_err(ours["pooled_prompt_embeds"], want_pooled.numpy()) <= 1e-5
    assert tuple(text_ids.shape) == (512, 3) and not text_ids.any()


@pytest.mark.parametrize("height,width", [(1024, 1024), (HEIGHT, WIDTH)])
@pytest.mark.parametrize("update", [{}, {"shift_terminal": 0.1}, {"use_dynamic_shifting": False}],
                         ids=["dynamic", "shift_terminal", "static"])
def test_plan_equals_diffusers_scheduler(flux, height, width, update):
    """FluxPipeline's `set_timesteps(sigmas=linspace(1, 1/N, N), mu=calculate_shift(image tokens))`,
    bit for bit (the same float32/float64 arithmetic)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    _, ref, pipe = flux
    config = {k: v for k, v in ref.scheduler.config.items() if not k.startswith("_")} | update
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    n, seq = 28, (height // 16) * (width // 16)
    mu = calculate_shift(seq, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    timesteps, _ = retrieve_timesteps(scheduler, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=mu)

    ours = sampling.scheduler_plan(dataclasses.replace(pipe, scheduler=config), "flow_euler", n, height // 8,
                                   width // 8)
    np.testing.assert_array_equal(ours.timesteps, timesteps.numpy())
    np.testing.assert_array_equal(ours.tables["sigma"], scheduler.sigmas[:-1].numpy())
    np.testing.assert_array_equal(ours.tables["sigma_next"], scheduler.sigmas[1:].numpy())


def test_dev_trajectory_and_images_equal_diffusers(flux):
    """Embedded guidance (FluxPipeline's default 3.5), no CFG: every step's latents and the decoded
    images (`latents / scaling_factor + shift_factor`) as diffusers'."""
    _, ref, pipe = flux
    x = noise(0)
    steps, final = run_diffusers(ref, x, prompt=PROMPTS, num_inference_steps=STEPS)
    kw = dict(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, return_trajectory=True)
    ours = sampling.generate(pipe, PROMPTS, latents=x, **kw)
    assert ours["trajectory"].shape == steps.shape == (STEPS, 2, 16, 12, 16)
    errors = [rel_err(a, b) for a, b in zip(ours["trajectory"], steps)]
    assert max(errors) <= 1e-4, errors
    assert rel_err(ours["latents"], final) <= 1e-4

    with torch.no_grad():
        images = ref(prompt=PROMPTS, latents=pack(x), height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                     output_type="np").images
    assert ours["images"].shape == images.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(np.asarray(ours["images"]) - images).max() <= 1e-3

    compiled = sampling.compiled_programs(pipe)
    # Seeded noise is the other families' (`initial_noise`); true_cfg_scale without negative prompts
    # is no CFG, as in FluxPipeline. The same compiled program serves all three calls.
    seeded = sampling.generate(pipe, PROMPTS, seed=5, true_cfg_scale=4.0, **kw)
    again = sampling.generate(pipe, PROMPTS, latents=sampling.initial_noise([5, 6], (16, 12, 16)), **kw)
    np.testing.assert_allclose(seeded["latents"], again["latents"], rtol=1e-5, atol=1e-5)
    assert sampling.compiled_programs(pipe) == compiled


def test_true_cfg_equals_diffusers(flux):
    _, ref, pipe = flux
    x = noise(1)
    negatives = ["", "a blurry photo"]
    steps, final = run_diffusers(ref, x, prompt=PROMPTS, negative_prompt=negatives, true_cfg_scale=4.0,
                                 guidance_scale=2.5, num_inference_steps=STEPS)
    ours = sampling.generate(pipe, PROMPTS, latents=x, negative_prompts=negatives, true_cfg_scale=4.0,
                             guidance_scale=2.5, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH,
                             decode=False, return_trajectory=True)
    errors = [rel_err(a, b) for a, b in zip(ours["trajectory"], steps)]
    assert max(errors) <= 1e-4, errors
    assert rel_err(ours["latents"], final) <= 1e-4


class GatedTACA(FluxProbsProcessor):
    """γ on every row while the pipeline's current timestep is ≥ the threshold, else plain attention."""

    def __init__(self, pipe, store, gamma, threshold):
        super().__init__(store, text_len=512)
        self.pipe, self.gamma0, self.threshold = pipe, gamma, threshold

    def __call__(self, attn, hidden_states, *args, **kwargs):
        on = float(self.pipe._current_timestep) >= self.threshold
        self.gamma = torch.full((hidden_states.shape[0],), self.gamma0) if on else None
        return super().__call__(attn, hidden_states, *args, **kwargs)


def test_taca_equals_diffusers_and_acts_above_its_threshold_only(flux):
    """TACA in every double and single block while t ≥ t_thresh (here steps 0 and 1 of 4), its maps
    (`return_attn`: T5 tokens on the text axis) the reference's, averaged over blocks and steps."""
    _, ref, pipe = flux
    x = noise(2)
    t = sampling.scheduler_plan(pipe, "flow_euler", STEPS, 16, 12).timesteps
    threshold = float((t[1] + t[2]) / 2)
    store: list = []
    default = dict(ref.transformer.attn_processors)
    ref.transformer.set_attn_processor({k: GatedTACA(ref, store, 1.5, threshold) for k in default})
    try:
        steps, final = run_diffusers(ref, x, prompt=PROMPTS, num_inference_steps=STEPS)
    finally:
        ref.transformer.set_attn_processor(default)

    kw = dict(latents=x, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, decode=False,
              return_trajectory=True, return_attn=True)
    ours = sampling.generate(pipe, PROMPTS, taca=TACA(gamma=1.5, t_threshold=threshold), **kw)
    errors = [rel_err(a, b) for a, b in zip(ours["trajectory"], steps)]
    assert max(errors) <= 1e-4, errors
    assert rel_err(ours["latents"], final) <= 1e-4
    assert ours["attn"].shape == (2, 8, 6, 512)
    assert np.abs(np.asarray(ours["attn"]) - np.mean(store, axis=0).reshape(2, 8, 6, 512)).max() <= 1e-5

    # Off: a threshold above every timestep (the same program: γ0 and the threshold are arguments)
    # is diffusers' plain run; on, the first step already differs from it.
    plain, _ = run_diffusers(ref, x, prompt=PROMPTS, num_inference_steps=STEPS)
    off = sampling.generate(pipe, PROMPTS, taca=TACA(gamma=1.5, t_threshold=1001.0), **kw)
    assert max(rel_err(a, b) for a, b in zip(off["trajectory"], plain)) <= 1e-4
    assert rel_err(ours["trajectory"][0], plain[0]) > 1e-3


def test_sample_cli_writes_images_for_the_tiny_flux_folder(flux, tmp_path):
    """`python -m ctcal_jax.sample` on the FLUX folder: FluxPipeline's defaults (28 steps, guidance
    3.5), the plain layout; TACA and IterRef (the generic path: maps on the T5 tokens) run too."""
    folder, _, _ = flux
    out, prompts = tmp_path / "out", tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red cat", "subjects": ["cat"]}\n{"prompt": "a blue car", "subjects": ["car"]}\n')
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ctcal_jax.sample", "--config", str(ROOT / "configs" / "demo.py"),
                           f"--config.model.pretrained={folder}", "--config.sample.height=64",
                           "--config.sample.width=64", "--prompts", str(prompts), "--taca", "--iterref-step", "1",
                           "--config.sample.iterref.n_iters=2", "--out", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "wrote 2 images" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "grid.png", "prompts.jsonl"]
    settings = json.loads((out / "prompts.jsonl").read_text().splitlines()[0])["settings"]
    assert (settings["num_inference_steps"], settings["guidance_scale"]) == (28, 3.5)
    assert settings["scheduler"] == "flow_euler"
    assert settings["true_cfg_scale"] == 1.0 and settings["taca"]["t_threshold"] == 970.0
    assert settings["iterref"]["step"] == 1


def test_flux_arguments_are_checked(flux):
    _, _, pipe = flux
    with pytest.raises(ValueError, match="height=72: expected a positive multiple of the VAE's factor 8 × the 2×2"):
        sampling.generate(pipe, "a cat", height=72, width=64)
    sd2 = sampling.load_pipeline("builtin:shapes-sd2")
    with pytest.raises(ValueError, match="true_cfg_scale applies to FLUX.1"):
        sampling.generate(sd2, "a cat", true_cfg_scale=2.0)


def test_subject_attention_scorer_embeds_flux_dev_guidance(flux):
    """The sweep's built-in scorer on FLUX.1-dev: the maps on the T5 tokens, the embedded guidance
    passed (the pipeline's 3.5 by default; another value scores differently)."""
    from ctcal_jax import scorers

    _, _, pipe = flux
    images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    subjects = {"a red cat": ["cat"], "a blue car on a road": ["car", "road"]}

    def score(**kw):
        return scorers.subject_attention(pipe, subjects=subjects, **kw)(images, list(subjects))

    default = score()
    assert default.shape == (2,) and ((0 <= default) & (default <= 1)).all()
    assert not np.allclose(score(guidance=20.0), default, rtol=1e-6, atol=0)


def test_schnell_trajectory_equals_diffusers(flux, tmp_path):
    """FLUX.1-schnell: no guidance embedding (the guidance scale is not an input), the scheduler's
    static shift 1 instead of the dynamic one; the tiny folder with a schnell transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    folder, ref, _ = flux
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**{k: v for k, v in tiny.FLUX.items() if k != "_class_name"}
                                         | {"guidance_embeds": False}).eval()
    randomize(transformer, 2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    schnell = diffusers.FluxPipeline(**{**ref.components, "transformer": transformer, "scheduler": scheduler})
    schnell.set_progress_bar_config(disable=True)
    schnell.save_pretrained(tmp_path / "schnell", safe_serialization=True)
    pipe = sampling.load_pipeline(tmp_path / "schnell")
    assert not pipe.denoiser.guidance_embeds
    x = noise(5)
    steps, final = run_diffusers(schnell, x, prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=0.0)
    ours = sampling.generate(pipe, PROMPTS, latents=x, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH,
                             decode=False, return_trajectory=True)
    assert max(rel_err(a, b) for a, b in zip(ours["trajectory"], steps)) <= 1e-4
    assert rel_err(ours["latents"], final) <= 1e-4
    assert rel_err(ours["latents"], x) > 1e-2  # the model moved the latents
