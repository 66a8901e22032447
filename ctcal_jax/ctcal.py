"""CTCAL, cross-timestep attention calibration (SPEC §2–3), as pure jittable functions over arrays.

Axes: B batch, H, W map side (r × r), T text tokens of one stream, N noun slots (padded), C code
channels. Inputs:
- `student_maps`, `teacher_maps` `[B, H, W, T]`: raw image→text attention probabilities, mean over
  heads and layers, as the denoisers return them in `aux["attn"]`. For SD3 pass one stream
  (`[..., :77]` CLIP or `[..., 77:]` T5) with arrays built from that stream's tokenizer.
- `noun_weights` `[B, N, T]`, `token_mask` `[B, T]`: from `nouns.prepare_batch` (row i of
  `noun_weights` averages noun i's sub-tokens; all-zero rows are padding; `token_mask` marks the
  prompt's real tokens, the support of the re-weighting softmax).

Two map pipelines (SPEC §3): the alignment terms compare smoothed sub-token means, each min-max
normalised over space; the subject-balance regulariser uses the re-weighted (softmax ×100 over
the real tokens) smoothed sub-token means. Smoothing and the sub-token mean are both linear, so
they are applied in the cheaper order (mean first, N ≤ T maps to smooth).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ctcal_jax import schedules
# Re-exported: API.md documents `ctcal.gaussian_smooth`; the map processing lives in `maps`.
from ctcal_jax.maps import (  # noqa: F401
    all_token_weights,
    gaussian_kernel_1d,
    gaussian_smooth,
    group_mean,
    minmax_normalize,
    reweight,
    safe_div,
)
from ctcal_jax.models.resnet import conv, upsample_nearest


@dataclasses.dataclass(frozen=True)
class CTCALConfig:
    """Loss weights, map processing and the ablation switches of SPEC §3 (hashable: a static jit arg).

    Attributes:
      lambdas: (λ1 pixel MSE, λ2 semantic MSE through the encoder, λ3 reconstruction, λ4 balance).
      tau: margin τ of the balance regulariser.
      kernel_size, sigma: Gaussian smoothing (SD 2.1: 3, 0.5 on 16×16; SD3: 5, 0.5 on 64×64).
      reweight_scale: the ×100 of the re-weighting softmax.
      tokens: "nouns" (𝒴 from `noun_weights`) or "all" (every real token is its own group; ablation).
      semantic: False is the pixel-only ablation: λ2 and λ3 are dropped and the autoencoder unused.
      regularizer: False drops the λ4 term.
      adaptive_weight: λ_t = t_stu / T when True, else 1.
      adjectives: add ADJ words to 𝒴 (Table 6); read by data preparation (`nouns.prepare_batch`).
      teacher: "priority" (fixed t_tea: 0 for DDPM, argmax p_k/t_k for flow matching) or "below"
        (t_tea ~ U[0, t_stu), Table 5).
      teacher_t: overrides the "priority" timestep when set.
      num_train_timesteps: T of λ_t and of the teacher's schedule.
    """

    lambdas: tuple[float, float, float, float] = (0.01, 1.0, 0.01, 0.1)
    tau: float = 0.2
    kernel_size: int = 3
    sigma: float = 0.5
    reweight_scale: float = 100.0
    tokens: Literal["nouns", "all"] = "nouns"
    semantic: bool = True
    regularizer: bool = True
    adaptive_weight: bool = True
    adjectives: bool = False
    teacher: Literal["priority", "below"] = "priority"
    teacher_t: float | None = None
    num_train_timesteps: int = 1000


def default_config(family: Literal["sd2", "sd3"]) -> CTCALConfig:
    """SPEC defaults: SD 2.1 λ = (0.01, 1, 0.01, 0.1), k = 3; SD3 λ = (0.01, 1, 0.01, 0), k = 5; τ = 0.2."""
    if family == "sd2":
        return CTCALConfig()
    if family == "sd3":
        return CTCALConfig(lambdas=(0.01, 1.0, 0.01, 0.0), kernel_size=5)
    raise ValueError(f"family={family!r}: expected 'sd2' or 'sd3'")


# --- Map pipelines (SPEC §3) over the processing of SPEC §2 (`maps`) --------------------------------


def alignment_maps(maps: jax.Array, noun_weights: jax.Array, config: CTCALConfig) -> jax.Array:
    """Smoothed sub-token means, min-max normalised: `[B, H, W, T]` -> `[B, H, W, N]`."""
    smoothed = gaussian_smooth(group_mean(maps, noun_weights), config.kernel_size, config.sigma)
    return minmax_normalize(smoothed)


def balance_maps(maps: jax.Array, noun_weights: jax.Array, token_mask: jax.Array, config: CTCALConfig) -> jax.Array:
    """Re-weighted, sub-token-averaged, smoothed maps Â: `[B, H, W, T]` -> `[B, H, W, N]`."""
    weighted = reweight(maps, token_mask, config.reweight_scale)
    return gaussian_smooth(group_mean(weighted, noun_weights), config.kernel_size, config.sigma)


# --- Autoencoder (SPEC §3; architecture our choice) ----------------------------------------------


class MapAutoencoder(nn.Module):
    """Per-token map `[M, r, r, 1]` -> code `[M, 4, 4, 16]` -> reconstruction `[M, r, r, 1]` in (0, 1).

    Encoder: `log2(r/4)` stride-2 3×3 convs (`encoder_i`), GELU between them; the last gives the
    code (no activation). Decoder mirror: nearest ×2 up-sampling + 3×3 conv (`decoder_i`), GELU
    between, sigmoid at the end. r = 16 (SD 2.1) has 2 stages, r = 64 (SD3) 4.
    """

    map_size: int
    width: int = 32
    code_channels: int = 16
    code_size: int = 4

    def setup(self):
        stages = math.log2(self.map_size / self.code_size)
        if stages < 1 or stages != int(stages):
            raise ValueError(f"map_size={self.map_size} must be {self.code_size}·2^k with k ≥ 1")
        hidden = [self.width] * (int(stages) - 1)
        self.encoder = [conv(c, 3, jnp.float32, f"encoder_{i}", stride=2)
                        for i, c in enumerate(hidden + [self.code_channels])]
        self.decoder = [conv(c, 3, jnp.float32, f"decoder_{i}") for i, c in enumerate(hidden + [1])]

    def encode(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.encoder):
            x = layer(x if i == 0 else nn.gelu(x, approximate=False))
        return x

    def decode(self, z: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.decoder):
            z = layer(upsample_nearest(z if i == 0 else nn.gelu(z, approximate=False)))
        return nn.sigmoid(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def init_autoencoder(rng: jax.Array, map_size: int) -> Any:
    """Parameters of `MapAutoencoder(map_size)`."""
    return MapAutoencoder(map_size).init(rng, jnp.zeros((1, map_size, map_size, 1), jnp.float32))["params"]


# --- Loss (SPEC §3) ---------------------------------------------------------------------------------


def _per_map_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[M, ...]` pairs -> `[M]` mean squared error."""
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)


def _one_map_per_row(maps: jax.Array) -> jax.Array:
    """`[B, H, W, N]` -> `[B·N, H, W, 1]`, the autoencoder's batch."""
    b, h, w, n = maps.shape
    return maps.transpose(0, 3, 1, 2).reshape(b * n, h, w, 1)


def ctcal_terms(
    student_maps: jax.Array,
    teacher_maps: jax.Array,
    noun_weights: jax.Array,
    token_mask: jax.Array,
    ae_params: Any,
    config: CTCALConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-sample `L_CTCAL` `[B]` (before λ_t) and its unweighted terms, each `[B]` and averaged over
    the sample's nouns: "pixel" D(A_stu, A_tea), "semantic" D(enc A_stu, enc A_tea), "recon"
    D(dec enc A_tea, A_tea), "balance" mean_i ReLU(S − max Â_stu,i − τ), and "nouns" (count).
    A sample without nouns gets exactly 0. `ae_params` may be None when `config.semantic` is off.
    """
    student = student_maps.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_maps.astype(jnp.float32))
    weights = all_token_weights(token_mask) if config.tokens == "all" else noun_weights.astype(jnp.float32)
    valid = (weights.sum(-1) > 0).astype(jnp.float32)  # [B, N]
    count = valid.sum(-1)
    has_nouns = count > 0

    def noun_mean(d):  # [B, N] -> [B], 0 for a sample with no nouns
        return safe_div((d * valid).sum(-1), count, has_nouns)

    b, h, _, _ = student.shape
    n = weights.shape[1]
    a_stu = alignment_maps(student, weights, config)
    a_tea = alignment_maps(teacher, weights, config)
    l1, l2, l3, l4 = config.lambdas
    terms = {"pixel": noun_mean(((a_stu - a_tea) ** 2).mean(axis=(1, 2))), "nouns": count}
    loss = l1 * terms["pixel"]

    if config.semantic:
        _check_autoencoder(ae_params, student.shape[1:3])
        ae = MapAutoencoder(h)
        x_stu, x_tea = _one_map_per_row(a_stu), _one_map_per_row(a_tea)
        code_stu = ae.apply({"params": ae_params}, x_stu, method="encode")
        code_tea = ae.apply({"params": ae_params}, x_tea, method="encode")
        recon = ae.apply({"params": ae_params}, code_tea, method="decode")
        terms["semantic"] = noun_mean(_per_map_mse(code_stu, code_tea).reshape(b, n))
        terms["recon"] = noun_mean(_per_map_mse(recon, x_tea).reshape(b, n))
        loss = loss + l2 * terms["semantic"] + l3 * terms["recon"]

    if config.regularizer:
        peaks = balance_maps(student, weights, token_mask, config).max(axis=(1, 2)) * valid  # [B, N], Â ≥ 0
        top = peaks.max(axis=-1, keepdims=True)
        terms["balance"] = noun_mean(jax.nn.relu(top - peaks - config.tau))
        loss = loss + l4 * terms["balance"]
    return loss, terms


def _check_autoencoder(ae_params: Any, map_shape: tuple[int, int]) -> None:
    """The semantic terms need the map autoencoder's params, built for the captured maps' size."""
    if ae_params is None:
        raise ValueError('ctcal: the semantic terms (config.semantic) need the map autoencoder: put '
                         '`ctcal.init_autoencoder(rng, r)` (r = the maps\' side) in the trainable tree as "ae", '
                         'or turn ctcal.semantic off')
    stages = sum(1 for name in ae_params if str(name).startswith("encoder_"))
    size = MapAutoencoder.code_size * 2**stages
    if map_shape != (size, size):
        raise ValueError(f"ctcal: the map autoencoder was built for {size}×{size} maps "
                         f"(init_autoencoder(rng, {size})) but the captured maps are {map_shape[0]}×{map_shape[1]}; "
                         f"build it for {map_shape[0]} (config.ctcal.map_resolution) or capture {size}×{size} maps")


def adaptive_weight(t_stu: jax.Array, config: CTCALConfig) -> jax.Array:
    """λ_t = t_stu / T `[B]` float32 (1 when `config.adaptive_weight` is off)."""
    t = jnp.asarray(t_stu, jnp.float32)
    return t / config.num_train_timesteps if config.adaptive_weight else jnp.ones_like(t)


def ctcal_loss(
    student_maps: jax.Array,
    teacher_maps: jax.Array,
    noun_weights: jax.Array,
    token_mask: jax.Array,
    ae_params: Any,
    t_stu: jax.Array,
    config: CTCALConfig,
    t_tea: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CTCAL part of the training loss: `mean_b λ_t · L_CTCAL` (scalar) and batch-mean metrics
    `ctcal_<term>` (unweighted terms), `ctcal` (mean L_CTCAL) and `ctcal_weighted` (the scalar).

    The full objective is `gors_weighted_mean(diffusion_loss, reward) + ctcal_loss(...)[0]`.
    Teacher maps get no gradient; the autoencoder gets gradients through λ2 and λ3. With `t_tea`, a
    sample whose teacher is not cleaner than its student (`t_tea ≥ t_stu`) has no term (our
    choice: SD3's fixed teacher timestep can lie above a small sampled t_stu).
    """
    per_sample, terms = ctcal_terms(student_maps, teacher_maps, noun_weights, token_mask, ae_params, config)
    weight = adaptive_weight(t_stu, config)
    if t_tea is not None:
        weight = weight * (jnp.asarray(t_tea, jnp.float32) < jnp.asarray(t_stu, jnp.float32))
    loss = (weight * per_sample).mean()
    metrics = {f"ctcal_{k}": v.mean() for k, v in terms.items()}
    metrics.update(ctcal=per_sample.mean(), ctcal_weighted=loss)
    return loss, metrics


def gors_weighted_mean(per_sample_loss: jax.Array, reward: jax.Array | None = None) -> jax.Array:
    """`mean_b w_gors · L_b`: the sample's reward as its weight (GORS), 1 when the data has none."""
    if reward is None:
        return per_sample_loss.mean()
    return (jnp.asarray(reward, per_sample_loss.dtype) * per_sample_loss).mean()


# --- Teacher timestep (SPEC §3) --------------------------------------------------------------------


def teacher_timestep(
    sampler: Literal["uniform", "logit_normal"] = "uniform",
    shift: float = 3.0,
    mean: float = 0.0,
    std: float = 1.0,
    num_train_timesteps: int = 1000,
) -> float:
    """The fixed teacher timestep, argmax_k p_k / t_k over the training sampler's timesteps.

    "uniform" (DDPM, p_k = 1/T over t_k = k): 0. "logit_normal": over diffusers'
    `FlowMatchEulerDiscreteScheduler(shift)` timesteps t_k with p_k = P(floor(u·T) = k),
    u = sigmoid(mean + std·n) (`schedules.logit_normal_probs`). Scheduler units.
    """
    if sampler == "uniform":
        return 0.0
    if sampler != "logit_normal":
        raise ValueError(f"sampler={sampler!r}: expected 'uniform' or 'logit_normal'")
    # Host numpy only, so this also runs while a step is being traced.
    sigmas = schedules.flow_match_sigmas(num_train_timesteps, shift)
    t = (sigmas * np.float32(num_train_timesteps)).astype(np.float64)
    priority = schedules.logit_normal_probs(num_train_timesteps, mean, std) / t
    return float(t[np.argmax(priority)])


def random_teacher_timesteps(rng: jax.Array, t_stu: jax.Array, integer: bool) -> jax.Array:
    """t_tea ~ U[0, t_stu) per sample (Table 5): integers for DDPM (`integer`; 0 when t_stu = 0),
    floats for flow matching (σ_tea = t_tea / T, `schedules.flow_sigmas`)."""
    t = jnp.asarray(t_stu, jnp.float32)
    draw = jax.random.uniform(rng, t.shape) * t
    return jnp.floor(draw).astype(jnp.int32) if integer else draw


def teacher_timesteps(
    rng: jax.Array,
    t_stu: jax.Array,
    config: CTCALConfig,
    sampler: Literal["uniform", "logit_normal"] = "uniform",
    shift: float = 3.0,
    mean: float = 0.0,
    std: float = 1.0,
) -> jax.Array:
    """t_tea `[B]` for `config.teacher`: int32 for the "uniform" (DDPM) sampler, else float32.

    "priority" broadcasts `config.teacher_t`, else `teacher_timestep(sampler, ...)`; "below" draws
    `random_teacher_timesteps`. `rng` is unused by "priority".
    """
    integer = sampler == "uniform"
    if config.teacher == "below":
        return random_teacher_timesteps(rng, t_stu, integer)
    if config.teacher != "priority":
        raise ValueError(f"teacher={config.teacher!r}: expected 'priority' or 'below'")
    fixed = config.teacher_t
    if fixed is None:
        fixed = teacher_timestep(sampler, shift, mean, std, config.num_train_timesteps)
    return jnp.full(jnp.shape(t_stu), fixed, jnp.int32 if integer else jnp.float32)
