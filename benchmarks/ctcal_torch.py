"""The PyTorch reference of `benchmarks/ctcal_step.py`: diffusers + peft models, the CTCAL loss written
in PyTorch from SPEC §3, one training step; and the set-up both sides share (LoRA rank and targets,
AdamW groups, prediction type, shift), so the two steps are built from the same numbers."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from tiny import JointProbsProcessor  # tests/tiny.py: SD3 joint attention, explicit softmax
from benchmarks.common import (
    UNetMapsProcessor, captured_unet_layers, jax_params, to_torch_device, torch_device, torch_sync,
    unit_scale_init,
)
from ctcal_jax import ctcal, lora, schedules
from ctcal_jax.paths import join_path

# ------------------------------------------------------------------------------------ shared set-up

LORA_RANK, LORA_ALPHA = 4, 4.0
LORA_B_SCALE = 0.1  # B ~ N(0, 0.1²) instead of 0, so the step-0 check exercises the adapters
TEXT_LORA_TARGETS = r"self_attn\.(q|k|v|out)_proj$"
# Per family: the denoiser's component name, its text encoders (frozen-tree names) and the torch
# module names of the LoRA targets (`lora.DEFAULT_TARGETS` for the denoiser, `TEXT_LORA_TARGETS`).
DENOISER = {"sd2": "unet", "sd3": "transformer"}
TEXT_ENCODERS = {"sd2": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}
TORCH_DENOISER_LORA = ["to_q", "to_k", "to_v", "to_out.0"]
TORCH_TEXT_LORA = ["q_proj", "k_proj", "v_proj", "out_proj"]
# learning rate, weight decay (SPEC §3): the denoiser LoRA and the autoencoder, the text LoRA.
DENOISER_OPT, TEXT_OPT = (5e-5, 0.01), (5e-6, 0.01)
ADAM = dict(b1=0.9, b2=0.999, eps=1e-8)
PREDICTION_TYPE = "v_prediction"
SD3_SHIFT = 3.0


def optimizer_groups(family: str) -> dict[str, tuple[float, float]]:
    """Trainable component -> (learning rate, weight decay)."""
    return {DENOISER[family]: DENOISER_OPT, "ae": DENOISER_OPT, **{c: TEXT_OPT for c in TEXT_ENCODERS[family]}}


def ctcal_config(family: str) -> ctcal.CTCALConfig:
    """SPEC defaults (SD3's fixed teacher timestep, 570.6 at shift 3, is resolved by the family on the
    JAX side and by `teacher_timestep` on the torch side)."""
    return ctcal.default_config(family)


def as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


def compare(jax_m: dict[str, Any], torch_m: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per metric both sides have: both values and |jax − torch| / |torch|."""
    jax_m, torch_m = as_floats(jax_m), as_floats(torch_m)
    return {k: {"jax": jax_m[k], "torch": torch_m[k],
                "rel_diff": abs(jax_m[k] - torch_m[k]) / max(abs(torch_m[k]), 1e-30)}
            for k in torch_m if k in jax_m}


# ----------------------------------------------------------------------------------------- PyTorch side


class TorchMapAutoencoder(torch.nn.Module):
    """`ctcal.MapAutoencoder` in torch (NCHW): stride-2 3×3 convs with GELU between them down to a
    `[16, 4, 4]` code; mirror decoder of nearest ×2 up-sampling + 3×3 conv, GELU between, sigmoid."""

    def __init__(self, map_size: int, width: int = 32, code_channels: int = 16, code_size: int = 4):
        super().__init__()
        hidden = [width] * (int(math.log2(map_size // code_size)) - 1)
        enc = list(zip([1] + hidden, hidden + [code_channels]))
        dec = list(zip([code_channels] + hidden, hidden + [1]))
        self.encoder = torch.nn.ModuleList(torch.nn.Conv2d(i, o, 3, stride=2, padding=1) for i, o in enc)
        self.decoder = torch.nn.ModuleList(torch.nn.Conv2d(i, o, 3, padding=1) for i, o in dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.encoder):
            x = conv(x if i == 0 else F.gelu(x))
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.decoder):
            z = conv(F.interpolate(z if i == 0 else F.gelu(z), scale_factor=2, mode="nearest"))
        return torch.sigmoid(z)


def torch_autoencoder(params: dict[str, Any], map_size: int) -> TorchMapAutoencoder:
    """The torch autoencoder holding the Flax `MapAutoencoder` params (kernels HWIO -> OIHW)."""
    ae = TorchMapAutoencoder(map_size)
    with torch.no_grad():
        for part in ("encoder", "decoder"):
            for i, conv in enumerate(getattr(ae, part)):
                p = params[f"{part}_{i}"]
                conv.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
                conv.bias.copy_(torch.from_numpy(np.asarray(p["bias"]).copy()))
    return ae


def add_torch_lora(model, lp: dict[str, Any], target_modules: list[str]) -> int:
    """peft LoRA on `target_modules` (rank, alpha as ours) holding our A/B (`lora_A = Aᵀ`, `lora_B = Bᵀ`).
    Returns the number of adapted modules; raises if it differs from ours."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=target_modules))
    modules = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    ours = {join_path(path): ab for path, ab in lora.adapters(lp).items()}
    if len(modules) != len(ours):
        raise ValueError(f"peft adapted {len(modules)} modules, ctcal_jax {len(ours)}: the LoRA targets differ")
    with torch.no_grad():
        for name, ab in ours.items():
            m = modules.get(name) or modules[name.removeprefix("text_model.")]  # transformers 5 drops the prefix
            m.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ab["A"]).T.copy()))
            m.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ab["B"]).T.copy()))
    return len(modules)


def trainable_torch_params(module) -> list[torch.Tensor]:
    """The trainable (LoRA) parameters, cast to float32 (diffusers' `cast_training_params`)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def gaussian_kernel_2d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Attend-and-Excite's `GaussianSmoothing` weights `[1, 1, k, k]`: ∝ exp(-((x − μ)/(2σ))²) per axis."""
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    w = torch.exp(-((x / (2 * sigma)) ** 2))
    w = w / w.sum()
    return torch.outer(w, w)[None, None]


def smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """`[B, N, H, W]` Gaussian smoothing, reflect padding, same size."""
    b, n, h, w = maps.shape
    pad = kernel.shape[-1] // 2
    x = F.pad(maps.reshape(b * n, 1, h, w), (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, kernel).reshape(b, n, h, w)


def minmax(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max over space to [0, 1]; a constant map gives 0."""
    lo = maps.amin(dim=(2, 3), keepdim=True)
    span = maps.amax(dim=(2, 3), keepdim=True) - lo
    ok = span > eps
    return torch.where(ok, (maps - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(maps))


def torch_ctcal_terms(student, teacher, noun_weights, token_mask, ae, config: ctcal.CTCALConfig, kernel):
    """Per-sample L_CTCAL `[B]` before λ_t, and its terms `[B]` (SPEC §3). Maps `[B, H, W, T]` fp32."""
    valid = (noun_weights.sum(-1) > 0).float()  # [B, N]
    count = valid.sum(-1)

    def noun_mean(d):  # [B, N] -> [B]; 0 for a sample without nouns
        return torch.where(count > 0, (d * valid).sum(-1) / count.clamp_min(1.0), torch.zeros_like(count))

    def grouped(maps):  # sub-token mean then smoothing (both linear): [B, N, H, W]
        return smooth(torch.einsum("bhwt,bnt->bnhw", maps, noun_weights), kernel)

    def per_map_mse(a, b):
        return ((a - b) ** 2).flatten(1).mean(1)

    b, h, w, _ = student.shape
    n = noun_weights.shape[1]
    a_stu, a_tea = minmax(grouped(student)), minmax(grouped(teacher))
    x_stu, x_tea = a_stu.reshape(b * n, 1, h, w), a_tea.reshape(b * n, 1, h, w)
    code_tea = ae.encode(x_tea)
    terms = {
        "pixel": noun_mean(((a_stu - a_tea) ** 2).mean(dim=(2, 3))),
        "semantic": noun_mean(per_map_mse(ae.encode(x_stu), code_tea).view(b, n)),
        "recon": noun_mean(per_map_mse(ae.decode(code_tea), x_tea).view(b, n)),
    }
    mask = token_mask[:, None, None, :]
    weighted = torch.where(mask, torch.softmax(torch.where(mask, config.reweight_scale * student,
                                                           torch.full_like(student, -1e30)), -1), 0.0)
    peaks = grouped(weighted).amax(dim=(2, 3)) * valid  # [B, N]
    terms["balance"] = noun_mean(F.relu(peaks.amax(-1, keepdim=True) - peaks - config.tau))
    l1, l2, l3, l4 = config.lambdas
    loss = l1 * terms["pixel"] + l2 * terms["semantic"] + l3 * terms["recon"] + l4 * terms["balance"]
    return loss, {**terms, "nouns": count}


# Text streams of the maps, as the JAX families define them: name -> (token slice on the last map axis,
# batch key of its noun weights, batch key of its token mask).
STREAMS = {
    "sd2": {"clip": (slice(None), "noun_weights", "token_mask")},
    "sd3": {"clip": (slice(0, 77), "noun_weights_clip", "token_mask_clip"),
            "t5": (slice(77, None), "noun_weights_t5", "token_mask_t5")},
}


def take_maps(store: list[torch.Tensor], r: int) -> torch.Tensor:
    """The layer mean of the recorded head-mean maps `[B, r·r, T]` as `[B, r, r, T]` float32; empties `store`."""
    m = torch.stack(store).float().mean(0)
    store.clear()
    return m.reshape(m.shape[0], r, r, m.shape[-1])


def torch_ctcal_part(student, teacher, noun_weights, token_mask, ae, config, kernel, t_stu, t_tea):
    """`ctcal.ctcal_loss` in torch: `mean_b λ_t · [t_tea < t_stu] · L_CTCAL` and its metrics."""
    per_sample, terms = torch_ctcal_terms(student, teacher, noun_weights, token_mask, ae, config, kernel)
    weight = t_stu.float() / config.num_train_timesteps * (t_tea.float() < t_stu.float())
    part = (weight * per_sample).mean()
    return part, {**{f"ctcal_{k}": v.mean() for k, v in terms.items()}, "ctcal": per_sample.mean(),
                  "ctcal_weighted": part}


def sd2_forward(models, batch_t, preset, config):
    """SD 2.x: `(forward(noise=None, t_stu=None) -> outputs, captured layer names)`; t_tea = 0."""
    from diffusers import DDPMScheduler

    unet, text_encoder = models["unet"], models["text_encoder"]
    captured = captured_unet_layers(unet.attn_processors, dict(unet.config), preset["latent"], preset["resolution"])
    store: list[torch.Tensor] = []
    unet.set_attn_processor({n: (UNetMapsProcessor(store) if n in captured else p)
                             for n, p in unet.attn_processors.items()})
    sched = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type=PREDICTION_TYPE)
    x0, ids, r = batch_t["latents"], batch_t["input_ids"]["text_encoder"], preset["resolution"]

    def forward(noise=None, t_stu=None):
        noise = torch.randn_like(x0) if noise is None else noise
        if t_stu is None:
            t_stu = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        t_tea = torch.zeros_like(t_stu)  # SD 2.1: the teacher timestep is 0 (SPEC §3)
        context = text_encoder(ids).last_hidden_state
        with torch.no_grad():
            unet(sched.add_noise(x0, noise, t_tea), t_tea, context)
        teacher = take_maps(store, r)
        pred = unet(sched.add_noise(x0, noise, t_stu), t_stu, context).sample
        return {"pred": pred, "target": sched.get_velocity(x0, noise, t_stu), "student": take_maps(store, r),
                "teacher": teacher, "t_stu": t_stu, "t_tea": t_tea}

    return forward, captured


def sd3_forward(models, batch_t, preset, config):
    """SD3: `(forward(noise=None, t_stu=None, sigma_stu=None) -> outputs, captured block names)`.
    CLIP-L/G penultimate states concatenated, zero-padded to the T5 width, then the T5 stream;
    pooled = the two projections (`text.encode_prompts`); flow matching with logit-normal t_stu
    (diffusers' SD3 scripts), the fixed teacher timestep; maps of every joint block."""
    transformer, te1, te2 = models["transformer"], models["text_encoder"], models["text_encoder_2"]
    store: list[torch.Tensor] = []
    transformer.set_attn_processor(JointProbsProcessor(store, detach=False))
    captured = list(transformer.attn_processors)
    num_t = config.num_train_timesteps
    schedule = {k: torch.from_numpy(np.array(v)).to(torch_device())
                for k, v in schedules.flow_match_schedule(num_t, SD3_SHIFT).items()}
    t_tea_value = config.teacher_t if config.teacher_t is not None else ctcal.teacher_timestep(
        "logit_normal", SD3_SHIFT, num_train_timesteps=num_t)
    x0, t5, r = batch_t["latents"], batch_t["t5_embeds"], preset["resolution"]
    ids1, ids2 = batch_t["input_ids"]["text_encoder"], batch_t["input_ids"]["text_encoder_2"]

    def encode():
        hidden, pooled = [], []
        for te, ids in ((te1, ids1), (te2, ids2)):
            out = te(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, -1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], 1), torch.cat(pooled, -1)

    def forward(noise=None, t_stu=None, sigma_stu=None):
        noise = torch.randn_like(x0) if noise is None else noise
        if t_stu is None:  # logit-normal indices into the shifted schedule
            idx = (torch.sigmoid(torch.randn(x0.shape[0], device=x0.device)) * num_t).long().clamp(max=num_t - 1)
            t_stu, sigma_stu = schedule["timesteps"][idx], schedule["sigmas"][idx]
        t_tea = torch.full_like(t_stu, t_tea_value)
        context, pooled = encode()

        def denoise(t, sigma):
            s = sigma.reshape(-1, 1, 1, 1).to(x0.dtype)
            return transformer(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=context,
                               pooled_projections=pooled, timestep=t).sample

        with torch.no_grad():
            denoise(t_tea, t_tea / num_t)
        teacher = take_maps(store, r)
        pred = denoise(t_stu, sigma_stu)
        return {"pred": pred, "target": noise - x0, "student": take_maps(store, r), "teacher": teacher,
                "t_stu": t_stu, "t_tea": t_tea}

    return forward, captured


def make_torch_step(family: str, models: dict[str, Any], ae, batch: dict[str, np.ndarray], preset: dict[str, Any]):
    """`step(noise=None, t_stu=None[, sigma_stu=None]) -> metrics` (tensors, not read back): one CTCAL
    step in PyTorch, the metrics named as the JAX step's (`<stream>/…` with two streams)."""
    dev = torch_device()
    config = ctcal_config(family)
    batch_t = jax.tree.map(lambda x: torch.from_numpy(np.asarray(x).copy()).to(dev), batch)
    batch_t["latents"] = batch_t["latents"].permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    batch_t["input_ids"] = {k: v.long() for k, v in batch_t["input_ids"].items()}
    forward, captured = (sd2_forward if family == "sd2" else sd3_forward)(models, batch_t, preset, config)
    groups = {name: (list(ae.parameters()) if name == "ae" else trainable_torch_params(models[name]))
              for name in optimizer_groups(family)}
    optimizer = torch.optim.AdamW(
        [{"params": groups[name], "lr": lr, "weight_decay": wd} for name, (lr, wd) in optimizer_groups(family).items()],
        betas=(ADAM["b1"], ADAM["b2"]), eps=ADAM["eps"])
    params = [p for group in groups.values() for p in group]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=preset["dtype"] == "bfloat16")
    kernel = gaussian_kernel_2d(config.kernel_size, config.sigma).to(dev)
    streams = STREAMS[family]

    def step(**draws) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = forward(**draws)
        diffusion = ((out["pred"].float() - out["target"].float()) ** 2).flatten(1).mean(1)
        loss, metrics = diffusion.mean(), {"diffusion": diffusion.mean()}
        for name, (tokens, weights_key, mask_key) in streams.items():
            part, m = torch_ctcal_part(out["student"][..., tokens], out["teacher"][..., tokens], batch_t[weights_key],
                                       batch_t[mask_key], ae, config, kernel, out["t_stu"], out["t_tea"])
            loss = loss + part / len(streams)
            prefix = "" if len(streams) == 1 else f"{name}/"
            metrics.update({prefix + k: v for k, v in m.items()})
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        optimizer.step()
        torch_sync()
        return {"loss": loss, **metrics, "grad_norm": grad_norm}

    step.captured_layers = captured
    return step


def loss_check(family: str, ae_params: Any, ae: TorchMapAutoencoder, batch: dict[str, np.ndarray], resolution: int,
               seed: int = 0) -> dict[str, dict[str, float]]:
    """Both CTCAL loss implementations on the same peaked random maps (softmax over the tokens of
    3·N(0, 1) logits plus a per-token 3·N(0, 1) bias, so some nouns draw much more attention than
    others), where every term is non-zero, the balance regulariser included (at step 0 the random
    models' maps are too flat to pass its margin τ). SD3: its CLIP stream's tokens."""
    config = ctcal_config(family)
    _, weights_key, mask_key = next(iter(STREAMS[family].values()))
    noun_weights, token_mask = batch[weights_key], batch[mask_key]
    b, t = token_mask.shape
    normal = np.random.default_rng(seed).standard_normal
    logits = (3 * normal((2, b, resolution, resolution, t)) + 3 * normal((2, b, 1, 1, t))).astype(np.float32)
    maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    _, jax_terms = ctcal.ctcal_terms(maps[0], maps[1], noun_weights, token_mask, ae_params, config)
    dev = torch_device()
    tensors = [torch.from_numpy(x).to(dev) for x in (maps[0], maps[1], noun_weights, token_mask)]
    kernel = gaussian_kernel_2d(config.kernel_size, config.sigma).to(dev)
    with torch.no_grad():
        _, torch_terms = torch_ctcal_terms(*tensors, ae, config, kernel)
    return compare({k: v.mean() for k, v in jax_terms.items()}, {k: v.mean() for k, v in torch_terms.items()})


# ------------------------------------------------------------------------------------------------ set-up


def components(preset: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Per frozen-tree name: (PyTorch class, conversion family, the preset's config)."""
    if preset["family"] == "sd2":
        return {"unet": ("UNet2DConditionModel", "unet", preset["unet"]),
                "text_encoder": ("CLIPTextModel", "clip", preset["clip"])}
    return {"transformer": ("SD3Transformer2DModel", "mmdit", preset["transformer"]),
            "text_encoder": ("CLIPTextModelWithProjection", "clip", preset["clip"]),
            "text_encoder_2": ("CLIPTextModelWithProjection", "clip", preset["clip_2"])}


def build_models(family: str, preset: dict[str, Any]):
    """The PyTorch denoiser and text encoders with random weights (fp32, CPU) and their ctcal_jax
    twins: `({name: torch model}, {name: Flax module}, {name: Flax params})`."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    dtype = jnp.dtype(preset["dtype"])
    torch_models, modules, frozen = {}, {}, {}
    for seed, (name, (cls, conversion, config)) in enumerate(components(preset).items()):
        if cls.startswith("CLIP"):
            model = getattr(transformers, cls)(transformers.CLIPTextConfig(**config))
        else:
            model = getattr(diffusers, cls)(**config)
        torch_models[name] = unit_scale_init(model, seed=seed)
        modules[name], frozen[name] = jax_params(model, conversion, dtype)
    return torch_models, modules, frozen


def to_torch_side(family: str, models: dict[str, Any], trainable: dict[str, Any], preset: dict[str, Any]):
    """Move the PyTorch models to the device (frozen weights in the preset's dtype), add the LoRA and
    build the autoencoder, all holding the JAX side's initial values. Returns (models, ae, counts)."""
    tdtype = getattr(torch, preset["dtype"])
    models = {name: to_torch_device(m, tdtype).train() for name, m in models.items()}
    counts = {}
    for name, m in models.items():
        m.requires_grad_(False)
        targets = TORCH_DENOISER_LORA if name == DENOISER[family] else TORCH_TEXT_LORA
        counts[name] = add_torch_lora(m, trainable[name], targets)
    ae = torch_autoencoder(trainable["ae"], preset["resolution"]).to(torch_device())
    return models, ae, counts
