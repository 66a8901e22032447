"""Inference schedulers as diffusers runs them, split into a host-side plan and a pure step.

Axes: N inference steps, B batch, h, w, C latent. `plan(kind, scheduler_config, N)` mirrors the
diffusers scheduler's `set_timesteps` on the host (numpy, the same float32/float64 arithmetic) and
returns a `Plan`: the timesteps the denoiser sees and per-step coefficient tables `[N]`. The step
`update(plan, x, out, tables_i, noise_i)` is diffusers' `step` for one index, pure and jittable, so
a whole denoising loop is one `lax.scan` over the tables.

| kind         | diffusers class                    | settings read from `scheduler_config.json`          |
|--------------|------------------------------------|------------------------------------------------------|
| `ddim`       | `DDIMScheduler` (η = 0)            | betas, prediction_type, timestep_spacing, steps_offset, set_alpha_to_one, clip_sample |
| `ddpm`       | `DDPMScheduler`                    | betas, prediction_type, spacing, offset, variance_type (fixed_small/large), clip_sample |
| `euler`      | `EulerDiscreteScheduler`           | betas, prediction_type, spacing, offset, final_sigmas_type |
| `flow_euler` | `FlowMatchEulerDiscreteScheduler`  | shift, use_dynamic_shifting (+ base/max shift and seq len), time_shift_type; shift_terminal |

Flow matching takes what the pipeline passes to `set_timesteps`: custom `sigmas` (FluxPipeline's
`flux_sigmas(N)`) and, with `use_dynamic_shifting`, the resolution-dependent shift `mu`
(`calculate_shift`, from the image token count).

The folder's `_class_name` does not matter: `kind` picks the algorithm, as
`Scheduler.from_config(pipe.scheduler.config)` does in diffusers. Options a plan cannot honour
(Karras sigmas, dynamic thresholding, zero-SNR rescaling, ...) raise ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from ctcal_jax import schedules

Kind = Literal["ddim", "ddpm", "euler", "flow_euler"]
KINDS: tuple[str, ...] = ("ddim", "ddpm", "euler", "flow_euler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Config keys that change the algorithm in ways not implemented here (fine when absent, None or false).
_UNSUPPORTED = ("thresholding", "rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "invert_sigmas", "stochastic_sampling", "trained_betas")


@dataclasses.dataclass(frozen=True)
class Plan:
    """One scheduler at one step count.

    Attributes:
      kind: the algorithm (module docstring).
      prediction_type: what the denoiser predicts (`epsilon`, `v_prediction`, `sample`; flow
        models predict the velocity and carry "flow").
      timesteps: `[N]` float32, what the denoiser is given at each step (scheduler units).
      init_noise_sigma: the initial latents are `noise · init_noise_sigma` (SD pipelines; 1 for flow).
      tables: per-step coefficients `[N]` float32 read by `update` (`a_t`/`a_prev` for DDIM and
        DDPM, `sigma`/`sigma_next` for Euler and flow).
      clip_sample: clamp the predicted x0 to ±this (DDIM/DDPM `clip_sample`), or None.
      variance_type: DDPM only (`fixed_small` or `fixed_large`).
    """

    kind: str
    prediction_type: str
    timesteps: np.ndarray
    init_noise_sigma: float
    tables: dict[str, np.ndarray]
    clip_sample: float | None = None
    variance_type: str = "fixed_small"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def stochastic(self) -> bool:
        """Whether `update` adds fresh noise (DDPM)."""
        return self.kind == "ddpm"

    def static(self) -> tuple[Any, ...]:
        """What `update` branches on (hashable; the tables are data)."""
        return (self.kind, self.prediction_type, self.clip_sample, self.variance_type)


def _check(kind: str, config: dict[str, Any]) -> None:
    if kind not in KINDS:
        raise ValueError(f"scheduler={kind!r}: expected one of {KINDS}")
    for key in _UNSUPPORTED:
        if config.get(key) not in (None, False):
            raise ValueError(f"scheduler config {key}={config[key]!r} is not supported by the {kind} sampler")
    if kind != "flow_euler":
        pred = config.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"scheduler config prediction_type={pred!r}: expected one of {PREDICTION_TYPES}")


def _spaced(config: dict[str, Any], n: int, dtype: Any) -> np.ndarray:
    """Discrete timesteps of DDIM/DDPM (int64) and Euler (float32), `timestep_spacing` as diffusers
    (whose default is "leading" for DDIM/DDPM and "linspace" for Euler)."""
    t_train = config.get("num_train_timesteps", 1000)
    spacing = config.get("timestep_spacing", "linspace" if dtype == np.float32 else "leading")
    if not 0 < n <= t_train:
        raise ValueError(f"num_inference_steps={n}: expected 1..{t_train} (the scheduler's num_train_timesteps)")
    if spacing == "linspace":
        if dtype == np.float32:
            return np.linspace(0, t_train - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, t_train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = t_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(dtype) + config.get("steps_offset", 0)
    if spacing == "trailing":
        return np.round(np.arange(t_train, 0, -t_train / n)).astype(dtype) - 1
    raise ValueError(f"scheduler config timestep_spacing={spacing!r}: expected 'linspace', 'leading' or 'trailing'")


def _alphas(config: dict[str, Any]) -> np.ndarray:
    return np.asarray(schedules.ddpm_from_config(config)["alphas_cumprod"], np.float32)


def calculate_shift(config: dict[str, Any], image_seq_len: int, default_max_shift: float = 1.16) -> float:
    """The pipelines' `calculate_shift`: the dynamic shift μ, linear in the image token count between
    (`base_image_seq_len`, `base_shift`) and (`max_image_seq_len`, `max_shift`) of the scheduler
    config. Absent keys take the pipelines' defaults 256, 0.5, 4096 and `default_max_shift`
    (StableDiffusion3Pipeline 1.16, FluxPipeline 1.15)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", default_max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """The unshifted sigmas FluxPipeline passes to `set_timesteps`: `linspace(1, 1/N, N)`."""
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps={n}: expected at least 1")
    return np.linspace(1.0, 1 / n, n)


def plan(kind: str, config: dict[str, Any], num_inference_steps: int, *, image_seq_len: int | None = None,
         sigmas: Any = None, mu: float | None = None) -> Plan:
    """The `Plan` of scheduler `kind` configured by a diffusers `scheduler_config.json` dict.

    Flow only, as a pipeline calls `set_timesteps`: `sigmas` `[N]`, custom unshifted sigmas (default
    the scheduler's own, `sigma_max` .. `sigma_min`); `mu`, the shift of `use_dynamic_shifting`
    configs (default `calculate_shift(config, image_seq_len)`, StableDiffusion3Pipeline's, which
    needs `image_seq_len`: image tokens per sample).
    """
    _check(kind, config)
    n = int(num_inference_steps)
    pred = config.get("prediction_type", "epsilon")
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
    if kind == "ddim":
        acp = _alphas(config)
        t = _spaced(config, n, np.int64)
        prev = t - config.get("num_train_timesteps", 1000) // n
        final = np.float32(1.0) if config.get("set_alpha_to_one", True) else acp[0]
        a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final).astype(np.float32)
        return Plan(kind, pred, t.astype(np.float32), 1.0, {"a_t": acp[t], "a_prev": a_prev}, clip)
    if kind == "ddpm":
        variance = config.get("variance_type", "fixed_small")
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"scheduler config variance_type={variance!r}: the ddpm sampler supports "
                             "'fixed_small' and 'fixed_large'")
        acp = _alphas(config)
        t = _spaced(config, n, np.int64)
        prev = np.append(t[1:], -1)  # diffusers' previous_timestep: the next entry of the list
        a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], np.float32(1.0)).astype(np.float32)
        return Plan(kind, pred, t.astype(np.float32), 1.0,
                    {"a_t": acp[t], "a_prev": a_prev, "noisy": (t > 0).astype(np.float32)}, clip, variance)
    if kind == "euler":
        final = config.get("final_sigmas_type", "zero")
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"scheduler config final_sigmas_type={final!r}: expected 'zero' or 'sigma_min'")
        if config.get("interpolation_type", "linear") != "linear":
            raise ValueError(f"scheduler config interpolation_type={config['interpolation_type']!r} is not supported")
        if config.get("timestep_type", "discrete") != "discrete":
            raise ValueError(f"scheduler config timestep_type={config['timestep_type']!r} is not supported")
        acp = _alphas(config)
        base = (((1 - acp) / acp) ** np.float32(0.5)).astype(np.float32)
        t = _spaced(config, n, np.float32)
        sigmas = np.interp(t, np.arange(len(base)), base)
        last = base[0] if final == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        top = sigmas.max()
        spacing = config.get("timestep_spacing", "linspace")
        init = top if spacing in ("linspace", "trailing") else (top**2 + np.float32(1)) ** np.float32(0.5)
        return Plan(kind, pred, t, float(np.float32(init)), {"sigma": sigmas[:-1], "sigma_next": sigmas[1:]})
    if config.get("use_dynamic_shifting", False) and mu is None:
        if image_seq_len is None:
            raise ValueError("a use_dynamic_shifting scheduler needs image_seq_len (or mu)")
        mu = calculate_shift(config, image_seq_len)
    sigmas = _flow_sigmas(config, n, sigmas, mu)
    return Plan(kind, "flow", sigmas * np.float32(config.get("num_train_timesteps", 1000)), 1.0,
                {"sigma": sigmas, "sigma_next": np.append(sigmas[1:], np.float32(0.0))})


def _flow_sigmas(config: dict[str, Any], n: int, sigmas: Any, mu: float | None) -> np.ndarray:
    """`FlowMatchEulerDiscreteScheduler.set_timesteps(n, sigmas=sigmas, mu=mu)` sigmas `[N]` float32
    (without the final 0)."""
    t_train = config.get("num_train_timesteps", 1000)
    if n < 1:
        raise ValueError(f"num_inference_steps={n}: expected at least 1")
    dynamic = bool(config.get("use_dynamic_shifting", False))
    shift = float(config.get("shift", 1.0))
    if sigmas is None:
        train = schedules.flow_match_sigmas(t_train, 1.0 if dynamic else shift)
        hi, lo = float(train[0]) * t_train, float(train[-1]) * t_train
        sigmas = np.linspace(hi, lo, n) / t_train
    else:
        sigmas = np.asarray(sigmas).astype(np.float32)
        if sigmas.shape != (n,):
            raise ValueError(f"sigmas: expected {n} values (num_inference_steps), got shape {sigmas.shape}")
    if dynamic:
        kind = config.get("time_shift_type", "exponential")
        if kind == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        elif kind == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            raise ValueError(f"scheduler config time_shift_type={kind!r}: expected 'exponential' or 'linear'")
    else:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    terminal = config.get("shift_terminal")
    if terminal:  # stretched so that the last sigma is `shift_terminal`
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return sigmas.astype(np.float32)


def scale_model_input(p: Plan, x: jax.Array, tables: dict[str, jax.Array]) -> jax.Array:
    """What the denoiser is given at a step: Euler divides by `√(σ² + 1)`, the others pass `x`."""
    if p.kind == "euler":
        return x / (tables["sigma"] ** 2 + 1) ** 0.5
    return x


def _x0_eps(p: Plan, x: jax.Array, out: jax.Array, a_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """DDIM/DDPM: the predicted clean sample and noise, as the schedulers' `step` computes them."""
    b_t = 1 - a_t
    if p.prediction_type == "epsilon":
        return (x - b_t**0.5 * out) / a_t**0.5, out
    if p.prediction_type == "sample":
        return out, (x - a_t**0.5 * out) / b_t**0.5
    return a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x


def update(p: Plan, x: jax.Array, out: jax.Array, tables: dict[str, jax.Array], noise: jax.Array | None = None
           ) -> jax.Array:
    """One scheduler step `x_t -> x_prev` from the (guided) model output `out`; `tables` holds this
    step's entries of `p.tables` (scalars). `noise` `[B, h, w, C]` is DDPM's variance noise. Float32
    arithmetic, the result in `out`'s dtype (as diffusers)."""
    dtype = out.dtype
    x, out = x.astype(jnp.float32), out.astype(jnp.float32)
    if p.kind in ("euler", "flow_euler"):
        sigma, sigma_next = tables["sigma"], tables["sigma_next"]
        if p.kind == "flow_euler":
            return (x + (sigma_next - sigma) * out).astype(dtype)
        if p.prediction_type == "epsilon":
            x0 = x - sigma * out
        elif p.prediction_type == "v_prediction":
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            x0 = out
        return (x + (x - x0) / sigma * (sigma_next - sigma)).astype(dtype)
    a_t, a_prev = tables["a_t"], tables["a_prev"]
    x0, eps = _x0_eps(p, x, out, a_t)
    if p.clip_sample is not None:
        x0 = jnp.clip(x0, -p.clip_sample, p.clip_sample)
    if p.kind == "ddim":
        return (a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps).astype(dtype)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    alpha = a_t / a_prev
    beta = 1 - alpha
    mean = (a_prev**0.5 * beta) / b_t * x0 + alpha**0.5 * b_prev / b_t * x
    if noise is None:
        raise ValueError("the ddpm sampler needs noise for every step")
    variance = jnp.maximum(b_prev / b_t * beta, 1e-20) if p.variance_type == "fixed_small" else beta
    return (mean + tables["noisy"] * variance**0.5 * noise.astype(jnp.float32)).astype(dtype)
