"""FLUX.1 TACA LoRA training (`configs/flux_taca.py`), against diffusers on `builtin:tiny-flux`.

- The training forward is diffusers' FLUX training math (`train_dreambooth_lora_flux.py`): the same
  noise and timesteps (t ≥ t_thresh), the noisy latents packed as FluxPipeline packs them, guidance
  3.5, the prompt through diffusers' CLIP and T5, TACA's scaled logits in every block (the explicit
  softmax of `tests.test_flux.FluxProbsProcessor`): prediction and target equal diffusers'.
- `prepare` writes FLUX.1 records: latents and T5's stream (diffusers' T5 on the same tokens).
- `python -m ctcal_jax.train --config configs/flux_taca.py:runlocal` trains on them and exports `lora/`;
  diffusers' `FluxPipeline.load_lora_weights` loads it, and sampling with it reproduces ours — with
  the LoRA always on, and with TACA, where the LoRA is active exactly while TACA is (diffusers'
  adapter switched off by a step callback once the timesteps fall below the threshold).
"""

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
pytest.importorskip("peft")

from ctcal_jax import builder, sampling, schedules, text  # noqa: E402
from ctcal_jax.attention import TACA  # noqa: E402
from ctcal_jax.data import records  # noqa: E402
from ctcal_jax.families import flux as flux_family  # noqa: E402
from ctcal_jax.prepare import prepare  # noqa: E402
from tests.data_setup import write_folder  # noqa: E402
from tests.test_configs import get_config  # noqa: E402
from tests.test_flux import torch_forward  # noqa: E402
# `flux`: the tiny FLUX.1-dev folder, diffusers' FluxPipeline on it and ours (a module fixture).
from tests.test_flux_sampling import GatedTACA, flux, noise, pack, run_diffusers  # noqa: E402, F401
from tests.tiny import rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flux_taca.py"
PROMPTS = ["a red cat next to a blue car", "two green apples on a book"]
HEIGHT, WIDTH, STEPS = 128, 96, 4  # as test_flux_sampling (its `noise`, `pack`, `run_diffusers`)
RES = 32  # training images: 4×4 latents, 2×2 packed tokens


def test_taca_training_forward_is_diffusers_training_math(flux):
    _, ref, pipe = flux
    taca = TACA(1.5, 970.0)
    family = flux_family.make_family(pipe.denoiser, pipe.encoders, shift=flux_family.training_shift(pipe.scheduler),
                                     guidance=3.5, objective="taca", taca=taca)
    x0 = np.random.default_rng(0).standard_normal((2, 8, 12, 16)).astype(np.float32)
    ids = {cname: np.asarray(tok["input_ids"]) for cname, tok in
           text.tokenize_prompts(pipe.encoders, PROMPTS).items()}
    batch = {"latents": x0, "input_ids": ids}
    rng = jax.random.key(3)
    out = jax.jit(family.forward)(pipe.params, {}, batch, rng)

    # The step's draws, as `families.flux` makes them: FLUX's unshifted sigmas, t ≥ 970.
    r_noise, r_t = jax.random.split(rng)
    eps = np.asarray(jax.random.normal(r_noise, x0.shape))
    schedule = schedules.flow_match_schedule(1000, 1.0)
    t, sigma = map(np.asarray, schedules.sample_flow_timesteps_above(r_t, schedule, 2, 970.0))
    assert flux_family.training_shift(pipe.scheduler) == 1.0 and (t >= 970).all()
    np.testing.assert_allclose(sigma, t / 1000, rtol=1e-6)

    with torch.no_grad():
        embeds, pooled, _ = ref.encode_prompt(PROMPTS, None, max_sequence_length=512)
    noisy = ((1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps).astype(np.float32)
    pred, _ = torch_forward(ref.transformer, noisy, t, embeds.numpy(), pooled.numpy(),
                            np.full(2, 3.5, np.float32), gamma=np.full(2, 1.5, np.float32))
    assert rel_err(np.asarray(out["pred"]), pred) <= 1e-4
    np.testing.assert_allclose(np.asarray(out["target"]), eps - x0, rtol=1e-6, atol=1e-6)
    plain, _ = torch_forward(ref.transformer, noisy, t, embeds.numpy(), pooled.numpy(), np.full(2, 3.5, np.float32))
    assert rel_err(pred, plain) > 1e-3  # TACA acts in the training forward


def test_flux_objectives_are_checked(flux):
    _, _, pipe = flux
    with pytest.raises(ValueError, match="objective='ctcal' is not available for FLUX.1"):
        flux_family.make_family(pipe.denoiser, pipe.encoders, objective="ctcal")
    with pytest.raises(ValueError, match="objective='taca' needs taca"):
        flux_family.make_family(pipe.denoiser, pipe.encoders, objective="taca")
    c = get_config(CONFIG, "runlocal")
    c.objective = "ctcal"
    with pytest.raises(ValueError, match="FLUX.1"):
        builder.make_family(c, pipe)


@pytest.fixture(scope="module")
def prepared(flux, tmp_path_factory):
    """An image folder prepared for the tiny FLUX.1-dev (`prepare`: latents and the T5 stream)."""
    tmp = tmp_path_factory.mktemp("flux_data")
    rows = [({"file_name": f"{i}.png", "text": p, "nouns": n}, (40, 32, "PNG")) for i, (p, n) in
            enumerate([("a cat on a sofa", ["cat", "sofa"]), ("a red car", ["car"]), ("two apples", ["apples"])])]
    images = write_folder(tmp / "images", rows)
    manifest = prepare(flux[0], images, tmp / "prepared", resolution=RES, max_nouns=4, batch_size=2)
    return tmp / "prepared", manifest


def test_prepare_writes_flux_latents_and_t5_stream(flux, prepared):
    _, ref, _ = flux
    out, manifest = prepared
    assert manifest["family"] == "flux" and manifest["records"] == 3
    assert manifest["shapes"]["latents"] == [RES // 8, RES // 8, 16] and manifest["shapes"]["t5_embeds"] == [512, 32]
    examples = [records.RecordsSource(out)[i] for i in range(3)]
    with torch.no_grad():
        t5 = ref.text_encoder_2(torch.from_numpy(np.stack([e["input_ids"]["text_encoder_2"] for e in examples])
                                                 .astype(np.int64)))[0].numpy()
    assert rel_err(np.stack([e["t5_embeds"] for e in examples]), t5) <= 1e-5
    assert (examples[0]["noun_weights_t5"].sum(-1) > 0).sum() == 2 and "noun_weights_clip" not in examples[0]


@pytest.fixture(scope="module")
def trained(flux, prepared, tmp_path_factory):
    """`python -m ctcal_jax.train --config configs/flux_taca.py:runlocal` on the tiny folder and the
    prepared records, as the full-size config trains (T5 not loaded: its stream comes with the data),
    with a learning rate that moves the outputs visibly in its 4 steps."""
    tmp = tmp_path_factory.mktemp("flux_train")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "ctcal_jax.train", "--config", f"{CONFIG}:runlocal", "--workdir", str(tmp / "run"),
         f"--config.model.pretrained={flux[0]}", "--config.data.kind=records", f"--config.data.path={prepared[0]}",
         f"--config.data.resolution={RES}", "--config.batch_size=2",
         "--config.optim.groups=(('^transformer/', 0.01, 0.0001),)"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "run"


def test_trainer_runs_the_taca_objective_and_exports(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["loss"] == r["diffusion"] for r in rows)
    assert (trained / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (trained / "figures").exists()  # no CTCAL maps to draw


def test_exported_lora_loads_in_diffusers_and_reproduces_sampling(flux, trained):
    """Ours with `lora=run/lora` against FluxPipeline with `load_lora_weights(run/lora)`: LoRA always
    on (no TACA), then TACA with the LoRA gated to TACA's steps (the training's intent, SPEC §4)."""
    _, ref, pipe = flux
    x = noise(4)
    kw = dict(latents=x, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, decode=False,
              return_trajectory=True)
    _, base = run_diffusers(ref, x, prompt=PROMPTS, num_inference_steps=STEPS)
    ref.load_lora_weights(trained / "lora")
    try:
        steps, final = run_diffusers(ref, x, prompt=PROMPTS, num_inference_steps=STEPS)
        ours = sampling.generate(pipe, PROMPTS, lora=trained / "lora", **kw)
        assert max(rel_err(a, b) for a, b in zip(ours["trajectory"], steps)) <= 1e-4
        assert rel_err(ours["latents"], final) <= 1e-4
        assert rel_err(ours["latents"], base) > 1e-3, "the trained LoRA changes nothing"

        # TACA on the first two steps, the LoRA with it: diffusers' adapter is switched off at the
        # end of the last step at or above the threshold.
        t = sampling.scheduler_plan(pipe, "flow_euler", STEPS, 16, 12).timesteps
        threshold = float((t[1] + t[2]) / 2)
        default = dict(ref.transformer.attn_processors)
        ref.transformer.set_attn_processor({k: GatedTACA(ref, [], 1.5, threshold) for k in default})

        def lora_while_taca(pipeline, i, timestep, kwargs):
            if i + 1 < STEPS and t[i + 1] < threshold:
                pipeline.disable_lora()
            return kwargs

        try:
            with torch.no_grad():
                gated = ref(prompt=PROMPTS, latents=pack(x), height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                            output_type="latent", callback_on_step_end=lora_while_taca).images
        finally:
            ref.transformer.set_attn_processor(default)
            ref.enable_lora()
        ours = sampling.generate(pipe, PROMPTS, lora=trained / "lora", taca=TACA(1.5, threshold), **kw)
        theirs = diffusers.FluxPipeline._unpack_latents(gated, HEIGHT, WIDTH, 8).numpy().transpose(0, 2, 3, 1)
        assert rel_err(ours["latents"], theirs) <= 1e-4
    finally:
        ref.unload_lora_weights()
