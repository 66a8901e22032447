"""SD3 / SD3.5 for the CTCAL step: CLIP-L and CLIP-G (LoRA), frozen T5, the MM-DiT (LoRA), flow
matching with logit-normal timesteps (diffusers' SD3 training scripts).

Batch keys: `latents` `[B, h, w, 16]` (`(z − shift) · scale`), `input_ids` `{"text_encoder": [B, 77],
"text_encoder_2": [B, 77]}` int32, `t5_embeds` `[B, 256, C_t5]` (precomputed: T5 stays frozen;
zeros for a pipeline without T5), the CTCAL token arrays of each stream (`noun_weights_clip`
`[B, N, 77]`, `token_mask_clip` `[B, 77]` from the CLIP-L tokenizer; `noun_weights_t5` `[B, N, 256]`,
`token_mask_t5` `[B, 256]` from the T5 tokenizer), optional `reward` `[B]`. `images` may replace
`latents` and `t5_embeds` may be absent (T5 then runs, frozen, inside the step): `families.common`. Frozen:
`{"transformer", "text_encoder", "text_encoder_2"}`. Trainable: `{"transformer": LoRA,
"text_encoder": LoRA, "text_encoder_2": LoRA (each optional), "ae": map autoencoder}`.

The joint maps `[B, h, w, 77 + 256]` keep the two streams apart (SPEC §2): the CTCAL loss runs on
each stream with its own tokens and is averaged over the two.
"""

from __future__ import annotations

import dataclasses

import jax
from absl import logging
from flax import linen as nn

from ctcal_jax import ctcal, schedules, text
from ctcal_jax.attention import TACA, AttnCapture
from ctcal_jax.families.common import Objective, check_objective, encode, latents, variables, with_remat
from ctcal_jax.models import remat as remat_lib
from ctcal_jax.train_step import Family

CLIP_TOKENS = 77


def make_family(
    transformer: nn.Module,
    encoders: text.PromptEncoders,
    config: ctcal.CTCALConfig | None,
    *,
    shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    capture_blocks: tuple[int, ...] | None = None,
    remat: remat_lib.Remat = "none",
    objective: Objective = "ctcal",
    taca: TACA | None = None,
    vae: nn.Module | None = None,
) -> Family:
    """The SD3 `Family`.

    Args:
      config: the CTCAL loss (`objective="ctcal"`; ignored otherwise). Its fixed teacher timestep
        (`argmax_k p_k / t_k` of this sampler, unless the config sets `teacher_t`) is computed here,
        on the host, once, and logged; the returned family's config carries it.
      capture_blocks: joint blocks whose maps are captured (None: all, SPEC §2).
      remat: what each block of the MM-DiT and the text encoders keeps for the backward pass.
      objective: "ctcal"; "diffusion" (the flow-matching loss alone, reward-weighted when the batch
        has `reward`: the GORS baseline); "taca" (SPEC §4: the flow-matching loss with `taca` active,
        timesteps drawn uniformly from the schedule's timesteps t ≥ `taca.t_threshold` — our reading
        of "timesteps in [t_thresh, 1000]" — so the LoRA learns exactly the steps where TACA acts).
      taca: the TACA setting of the "taca" objective.
      vae: the frozen VAE, needed when batches carry `images` rather than `latents`.
    """
    check_objective(objective, ("ctcal", "diffusion", "taca"), "SD3")
    if objective == "taca" and taca is None:
        raise ValueError("objective='taca' needs taca=TACA(gamma, t_threshold)")
    encoders = with_remat(encoders, remat)
    text_inputs = tuple(encoders.models)
    transformer = transformer.clone(remat=remat)
    num_t = (config or ctcal.CTCALConfig()).num_train_timesteps
    with_ctcal = objective == "ctcal"
    if with_ctcal and config.teacher == "priority" and config.teacher_t is None:
        t_tea = ctcal.teacher_timestep("logit_normal", shift, logit_mean, logit_std, num_t)
        logging.info("CTCAL SD3 teacher timestep t_tea = %.2f (logit-normal mean %g, std %g, shift %g)",
                     t_tea, logit_mean, logit_std, shift)
        config = dataclasses.replace(config, teacher_t=t_tea)
    schedule = schedules.flow_match_schedule(num_t, shift)
    capture = AttnCapture(blocks=capture_blocks) if with_ctcal else None
    attn_taca = taca if objective == "taca" else None

    def forward(frozen, trainable, batch, rng):
        r_noise, r_t, r_tea = jax.random.split(rng, 3)
        emb = encode(encoders, frozen, trainable, batch, t5_embeds=batch.get("t5_embeds"))
        context, pooled = emb["prompt_embeds"], emb["pooled_prompt_embeds"]
        x0 = latents(batch, frozen, vae, jax.random.fold_in(rng, 1))
        noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
        if objective == "taca":
            t_stu, sigma_stu = schedules.sample_flow_timesteps_above(r_t, schedule, x0.shape[0], taca.t_threshold)
        else:
            t_stu, sigma_stu = schedules.sample_flow_timesteps(r_t, schedule, x0.shape[0], logit_mean, logit_std)
        denoiser_vars = variables(frozen, trainable, "transformer")

        def denoise(v, t, sigma, ctx, pool):
            x_t = schedules.flow_noisy_input(x0, noise, sigma)
            return transformer.apply(v, x_t, t, ctx, pool, capture=capture, taca=attn_taca)

        pred, student = denoise(denoiser_vars, t_stu, sigma_stu, context, pooled)
        out = {"pred": pred, "target": schedules.flow_target(x0, noise)}
        if with_ctcal:
            stop = jax.lax.stop_gradient
            t_tea = ctcal.teacher_timesteps(r_tea, t_stu, config, "logit_normal", shift, logit_mean, logit_std)
            _, teacher = denoise(stop(denoiser_vars), t_tea, schedules.flow_sigmas(t_tea, num_t), stop(context),
                                 stop(pooled))
            out.update(student_maps=student["attn"], teacher_maps=stop(teacher["attn"]), t_stu=t_stu, t_tea=t_tea)
        return out

    if not with_ctcal:
        return Family(forward=forward, streams={}, ctcal=None, text_inputs=text_inputs)
    streams = {
        "clip": (slice(0, CLIP_TOKENS), "noun_weights_clip", "token_mask_clip"),
        "t5": (slice(CLIP_TOKENS, None), "noun_weights_t5", "token_mask_t5"),
    }
    return Family(forward=forward, streams=streams, ctcal=config, text_inputs=text_inputs)
