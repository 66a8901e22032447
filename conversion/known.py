"""Configs of the public pipelines the configs in `configs/` name, for building their steps with
abstract weights on a host that has neither the weights nor network access (compile checks, the
"every config builds" test). Transcribed from each hub repository's `config.json` files; a local
folder or a downloaded snapshot always takes precedence (`conversion.pipeline.abstract`).
"""

from __future__ import annotations

from typing import Any

# The SD 2.1 UNet (`stabilityai/stable-diffusion-2-1/unet/config.json`).
SD21_UNET = dict(
    _class_name="UNet2DConditionModel", sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, use_linear_projection=True,
)
# The SD 2.1 text encoder: OpenCLIP ViT-H/14's text tower as transformers `CLIPTextModel` (23 of 24 layers).
OPENCLIP_H = dict(
    architectures=["CLIPTextModel"], vocab_size=49408, hidden_size=1024, intermediate_size=4096,
    num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
    layer_norm_eps=1e-5, projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# SD3-medium's MM-DiT and text encoders (`stabilityai/stable-diffusion-3-medium-diffusers`).
SD3_MEDIUM = dict(
    _class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, out_channels=16,
    num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
)
CLIP_L = dict(
    architectures=["CLIPTextModelWithProjection"], vocab_size=49408, hidden_size=768, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
CLIP_G = dict(
    architectures=["CLIPTextModelWithProjection"], vocab_size=49408, hidden_size=1280, intermediate_size=5120,
    num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
    layer_norm_eps=1e-5, projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# SD3.5-medium: MMDiT-X (dual attention in the first 13 blocks, RMS q/k norm).
SD35_MEDIUM = dict(
    _class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, out_channels=16,
    num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
# FLUX.1-dev's transformer (`black-forest-labs/FLUX.1-dev/transformer/config.json`); schnell differs only
# in having no guidance embedding.
FLUX_DEV = dict(
    _class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embeds": False}


def _sd2_scheduler(prediction_type: str) -> dict[str, Any]:
    return {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": prediction_type, "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1}


_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1-dev's `scheduler/scheduler_config.json`: the shift is set per resolution at sampling;
# schnell's is unshifted (shift 1, no dynamic shifting).
_FLUX_FLOW = {**_FLOW, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
              "max_image_seq_len": 4096}
_FLUX_SCHNELL_FLOW = {**_FLUX_FLOW, "shift": 1.0, "use_dynamic_shifting": False}
# FLUX.1's CLIP-L is a plain `CLIPTextModel` (the pooled output, no projection).
CLIP_L_POOLED = {**CLIP_L, "architectures": ["CLIPTextModel"]}

# hub id -> {"family", "scheduler", component -> config}. Text encoders as the step uses them (the SD3
# and FLUX.1 T5 streams come precomputed from `prepare`, so T5 is not part of the step).
PIPELINES: dict[str, dict[str, Any]] = {
    "stabilityai/stable-diffusion-2-1": {
        "family": "sd2", "scheduler": _sd2_scheduler("v_prediction"),
        "unet": SD21_UNET, "text_encoder": OPENCLIP_H,
    },
    "stabilityai/stable-diffusion-2-1-base": {
        "family": "sd2", "scheduler": _sd2_scheduler("epsilon"),
        "unet": {**SD21_UNET, "sample_size": 64}, "text_encoder": OPENCLIP_H,
    },
    "stabilityai/stable-diffusion-3-medium-diffusers": {
        "family": "sd3", "scheduler": _FLOW, "transformer": SD3_MEDIUM, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G,
    },
    "stabilityai/stable-diffusion-3.5-medium": {
        "family": "sd3", "scheduler": _FLOW, "transformer": SD35_MEDIUM, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G,
    },
    "black-forest-labs/FLUX.1-dev": {
        "family": "flux", "scheduler": _FLUX_FLOW, "transformer": FLUX_DEV, "text_encoder": CLIP_L_POOLED,
    },
    "black-forest-labs/FLUX.1-schnell": {
        "family": "flux", "scheduler": _FLUX_SCHNELL_FLOW, "transformer": FLUX_SCHNELL, "text_encoder": CLIP_L_POOLED,
    },
}
