"""Prompt encoding against diffusers' own `encode_prompt` on tiny pipelines saved to disk: SD 1.x-like
(quick_gelu CLIP, legacy EOS id), SD 2.x-like (gelu CLIP, "!" padding) and SD3 (CLIP-L, CLIP-G, T5;
also saved without T5). Tokenizers: the real 49408-token CLIP BPE and a tiny SentencePiece T5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from conversion import load_encoders
from ctcal_jax import text
from tests.tiny import randomize, real_clip_tokenizer, rel_err, tiny_t5_tokenizer

LONG = ", ".join(["a red apple next to a small blue boat on a calm lake"] * 8)  # > 77 CLIP tokens
PROMPTS = ["A giraffe next to a traffic light.", "", LONG]


def _clip(cls, hidden, seed, **kwargs):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden + 3,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=49406, pad_token_id=1, **kwargs)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed, scale=0.1)
    return model


def _vae(latent_channels, **kwargs):
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,), latent_channels=latent_channels, norm_num_groups=4, **kwargs)


def _sd_pipeline(folder, hidden_act, eos_token_id, pad_token):
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=4)
    pipe = StableDiffusionPipeline(
        vae=_vae(4), text_encoder=_clip(CLIPTextModel, 32, 0, hidden_act=hidden_act, eos_token_id=eos_token_id),
        tokenizer=real_clip_tokenizer(pad_token=pad_token), unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def _sd3_pipeline(folder, t5_tokenizer_folder):
    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(vocab_size=200, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu")).eval()
    randomize(t5, 2, scale=0.1)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
                                        caption_projection_dim=16, pooled_projection_dim=40, out_channels=16,
                                        pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=_clip(CLIPTextModelWithProjection, 32, 0, hidden_act="quick_gelu", projection_dim=16),
        tokenizer=real_clip_tokenizer(),
        text_encoder_2=_clip(CLIPTextModelWithProjection, 48, 1, hidden_act="gelu", projection_dim=24),
        tokenizer_2=real_clip_tokenizer(pad_token="!"),
        text_encoder_3=t5, tokenizer_3=tiny_t5_tokenizer(t5_tokenizer_folder))
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_sd_matches_diffusers(kind, tmp_path):
    settings = {"sd1": ("quick_gelu", 2, "<|endoftext|>"), "sd2": ("gelu", 49407, "!")}[kind]
    pipe = _sd_pipeline(tmp_path, *settings)
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    encoders, params = load_encoders(tmp_path)
    assert encoders.family == "sd" and encoders.max_lengths == {"text_encoder": 77}
    tokens = text.tokenize_prompts(encoders, PROMPTS)
    ids = {c: jnp.asarray(t["input_ids"]) for c, t in tokens.items()}
    ours = jax.jit(lambda p, i: text.encode_prompts(encoders, p, i))(params, ids)
    assert set(ours) == {"prompt_embeds"}
    assert ours["prompt_embeds"].shape == (3, 77, 32)
    assert rel_err(ours["prompt_embeds"], ref) <= 1e-4
    neg = text.encode_text(encoders, params, [""] * 3)
    assert rel_err(neg["prompt_embeds"], ref_neg) <= 1e-4


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    pipe = _sd3_pipeline(folder, tmp_path_factory.mktemp("t5_tokenizer"))
    with torch.no_grad():
        ref = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
                                 negative_prompt="")
    return folder, ref


def test_sd3_matches_diffusers(sd3):
    folder, (ref, ref_neg, ref_pooled, ref_neg_pooled) = sd3
    encoders, params = load_encoders(folder)
    assert encoders.family == "sd3"
    assert encoders.max_lengths == {"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 256}
    tokens = text.tokenize_prompts(encoders, PROMPTS)
    ids = {c: jnp.asarray(t["input_ids"]) for c, t in tokens.items()}
    ours = jax.jit(lambda p, i: text.encode_prompts(encoders, p, i))(params, ids)
    assert ours["prompt_embeds"].shape == (3, 77 + 256, 96)
    assert ours["pooled_prompt_embeds"].shape == (3, 16 + 24)
    assert rel_err(ours["prompt_embeds"], ref) <= 1e-4
    assert rel_err(ours["pooled_prompt_embeds"], ref_pooled) <= 1e-4
    # CLIP features are zero-padded from 32 + 48 to the T5 width.
    np.testing.assert_array_equal(ours["prompt_embeds"][:, :77, 80:], 0.0)
    neg = text.encode_text(encoders, params, [""] * 3)
    assert rel_err(neg["prompt_embeds"], ref_neg) <= 1e-4
    assert rel_err(neg["pooled_prompt_embeds"], ref_neg_pooled) <= 1e-4


def test_sd3_precomputed_t5(sd3):
    """The frozen T5 stream computed once outside jit gives the same embeddings."""
    folder, (ref, *_) = sd3
    encoders, params = load_encoders(folder)
    ids = {c: jnp.asarray(t["input_ids"]) for c, t in text.tokenize_prompts(encoders, PROMPTS).items()}
    t5 = text.t5_embeddings(encoders, params, ids)
    clip_params = {c: params[c] for c in ("text_encoder", "text_encoder_2")}
    ours = jax.jit(lambda p, i, t: text.encode_prompts(encoders, p, i, t5_embeds=t))(clip_params, ids, t5)
    assert rel_err(ours["prompt_embeds"], ref) <= 1e-4


def test_sd3_without_t5(sd3, tmp_path):
    """A pipeline saved without T5 (diffusers' documented memory saving): zeros for the T5 stream."""
    folder, _ = sd3
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS[:2], None, None, device="cpu",
                                                   do_classifier_free_guidance=False)
    encoders, params = load_encoders(tmp_path)
    assert "text_encoder_3" not in encoders.models and "text_encoder_3" not in encoders.tokenizers
    ours = text.encode_text(encoders, params, PROMPTS[:2])
    assert rel_err(ours["prompt_embeds"], ref) <= 1e-4
    assert rel_err(ours["pooled_prompt_embeds"], ref_pooled) <= 1e-4
    np.testing.assert_array_equal(ours["prompt_embeds"][:, 77:], 0.0)


def test_tokenize_offsets(sd3):
    """Offsets point each real token at its characters in the prompt; special/padding get (0, 0)."""
    folder, _ = sd3
    encoders, _ = load_encoders(folder)
    prompt = "A giraffe next to a traffic light."
    tokens = text.tokenize_prompts(encoders, [prompt, LONG])
    clip = tokens["text_encoder"]
    ids, offsets = clip["input_ids"], clip["offsets"]
    assert ids.dtype == offsets.dtype == np.int32
    assert ids.shape == (2, 77) and offsets.shape == (2, 77, 2)
    words = [prompt[s:e] for s, e in offsets[0] if e > s]
    assert words == ["A", "giraffe", "next", "to", "a", "traffic", "light", "."]
    eot = int(np.argmax(ids[0] == 49407))
    assert eot == 9 and (offsets[0, eot:] == 0).all() and (offsets[0, 0] == 0).all()
    assert ids[1, -1] == 49407  # truncated at 77 with the EOS kept, as diffusers
    t5 = tokens["text_encoder_3"]
    assert t5["input_ids"].shape == (2, 256)
    pieces = encoders.tokenizers["text_encoder_3"].convert_ids_to_tokens(t5["input_ids"][0].tolist())
    for piece, (s, e) in zip(pieces, t5["offsets"][0]):
        if e > s and piece not in ("▁", "<unk>"):
            assert prompt[s:e] == piece.lstrip("▁")


def test_load_encoders_refuses_unsupported_layouts(tmp_path):
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"], '
        '"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}')
    with pytest.raises(ValueError, match="text_encoder_2 without text_encoder_3"):
        load_encoders(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "text_encoder": [null, null]}')
    with pytest.raises(ValueError, match="no text_encoder"):
        load_encoders(tmp_path)
