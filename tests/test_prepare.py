"""`python -m ctcal_jax.prepare` end to end on tiny diffusers folders (random weights, saved with
`save_pretrained`): latents against diffusers' own VAE encoder, text arrays, the T5 stream (SD3),
bad rows counted, the records read back by the loader, and resume after a lost shard."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from conversion import load_encoders
from ctcal_jax import data, text
from ctcal_jax.data import records
from ctcal_jax.data.images import load_image
from ctcal_jax.prepare import main, prepare
from tests.data_setup import GOOD, RES, ROWS, tagger, write_folder
from tests.tiny import nchw, nhwc, randomize, real_clip_tokenizer, tiny_t5_tokenizer


def _clip(cls, hidden, seed, **kwargs):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=1, **kwargs)
    return cls(config).eval()


def _pipeline(folder, family):
    """A diffusers folder holding what `prepare` reads: the VAE, tokenizers and text encoders."""
    torch.manual_seed(0)
    kwargs = {"latent_channels": 4} if family == "sd" else dict(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
        shift_factor=0.0609)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                        **kwargs).eval()
    randomize(vae, 0)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}
    components = {"text_encoder": (_clip(CLIPTextModel if family == "sd" else CLIPTextModelWithProjection, 16, 1),
                                   "tokenizer", real_clip_tokenizer())}
    if family == "sd3":
        index["_class_name"] = "StableDiffusion3Pipeline"
        components["text_encoder_2"] = (_clip(CLIPTextModelWithProjection, 16, 2), "tokenizer_2",
                                        real_clip_tokenizer(pad_token="!"))
        torch.manual_seed(3)
        t5 = T5EncoderModel(T5Config(vocab_size=200, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                     feed_forward_proj="gated-gelu")).eval()
        randomize(t5, 3, scale=0.1)
        components["text_encoder_3"] = (t5, "tokenizer_3", tiny_t5_tokenizer(folder / "t5_source"))
    for name, (model, tok_name, tok) in components.items():
        model.save_pretrained(folder / name, safe_serialization=True)
        tok.save_pretrained(folder / tok_name)
        index[name] = ["transformers", type(model).__name__]
        index[tok_name] = ["transformers", type(tok).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return vae


def _read_all(out):
    src = data.RecordsSource(out)
    return [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


def test_prepare_sd_end_to_end_and_resume(tmp_path, images):
    vae = _pipeline(tmp_path / "model", "sd")
    out = tmp_path / "prepared"
    manifest = prepare(tmp_path / "model", images, out, resolution=RES, max_nouns=4, shard_size=3, batch_size=2,
                       tagger=tagger)
    # 9 rows in shards of 3: rows 0-2 (good: 0, 1), 3-5 (none), 6-8 (good: 7, 8).
    assert [s["records"] for s in manifest["shards"]] == [2, 0, 2]
    assert manifest["records"] == 4 and manifest["skipped_rows"] == 5 and manifest["rows"] == 9
    assert manifest["family"] == "sd" and manifest["shapes"]["latents"] == [8, 8, 4]
    assert set(manifest["keys"]) == {"latents", "input_ids/text_encoder", "noun_weights", "token_mask", "reward"}
    assert json.loads((out / records.MANIFEST).read_text()) == manifest

    examples = _read_all(out)
    pixels = np.stack([load_image(images / ROWS[i][0]["file_name"], RES) for i in GOOD])
    with torch.no_grad():
        ref = vae.encode(torch.tensor(nchw(pixels))).latent_dist.mean * vae.config.scaling_factor
    np.testing.assert_allclose(np.stack([e["latents"] for e in examples]), nhwc(ref.numpy()), atol=1e-5)
    encoders, _ = load_encoders(tmp_path / "model")
    for i, e in zip(GOOD, examples):
        meta = ROWS[i][0]
        want = data.text_example(encoders, meta["text"], meta.get("nouns"), meta.get("reward", 1.0), max_nouns=4,
                                 tagger=tagger)
        jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in e.items() if k != "latents"}, want)

    # Lose a shard (and the manifest): a re-run writes that shard again, the same, and nothing else.
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / records.shard_name(2)).unlink()
    (out / records.MANIFEST).unlink()
    again = prepare(tmp_path / "model", images, out, resolution=RES, max_nouns=4, shard_size=3, batch_size=2,
                    tagger=tagger)
    assert again == manifest
    for name, mtime in finished.items():
        assert ((out / name).stat().st_mtime_ns == mtime) == (name != records.shard_name(2))
    jax.tree.map(np.testing.assert_array_equal, _read_all(out), examples)
    assert not list(out.glob("*.tmp"))

    # The loader reads the records.
    c = data.default_config()
    c.kind, c.path, c.resolution, c.max_nouns = "records", str(out), RES, 4
    batch = next(data.make_loader(c, encoders, global_batch_size=4, seed=0))
    assert batch["latents"].shape == (4, 8, 8, 4) and batch["input_ids"]["text_encoder"].shape == (4, 77)

    with pytest.raises(ValueError, match="prepared with other arguments"):
        prepare(tmp_path / "model", images, out, resolution=RES, max_nouns=4, shard_size=4, tagger=tagger)


def test_prepare_cli_sd3_t5_stream(tmp_path):
    # Rows name their nouns: the command line's Stanza tagger never runs.
    rows = [({"file_name": f"{i}.png", "text": p, "nouns": n}, (20, 16, "PNG"))
            for i, (p, n) in enumerate([("a cat on a sofa", ["cat", "sofa"]), ("a red car", ["car"])])]
    images = write_folder(tmp_path / "images", rows)
    vae = _pipeline(tmp_path / "model", "sd3")
    out = tmp_path / "prepared"
    manifest = main(["--pretrained", str(tmp_path / "model"), "--data", str(images), "--out", str(out),
                     "--resolution", str(RES), "--max-nouns", "4", "--batch-size", "4"])
    assert manifest["family"] == "sd3" and manifest["records"] == 2 and manifest["skipped_rows"] == 0
    assert manifest["shapes"]["t5_embeds"] == [256, 16] and manifest["shapes"]["latents"] == [8, 8, 16]
    examples = _read_all(out)
    pixels = np.stack([load_image(images / f"{i}.png", RES) for i in range(2)])
    with torch.no_grad():
        z = vae.encode(torch.tensor(nchw(pixels))).latent_dist.mean
    ref = nhwc(((z - vae.config.shift_factor) * vae.config.scaling_factor).numpy())
    np.testing.assert_allclose(np.stack([e["latents"] for e in examples]), ref, atol=1e-5)
    encoders, params = load_encoders(tmp_path / "model")
    ids = np.stack([e["input_ids"]["text_encoder_3"] for e in examples])
    t5 = text.t5_embeddings(encoders, params, {"text_encoder_3": ids})
    np.testing.assert_allclose(np.stack([e["t5_embeds"] for e in examples]), t5, atol=1e-5)
    assert (examples[0]["noun_weights_t5"].sum(-1) > 0).sum() == 2
    assert (examples[0]["noun_weights_clip"].sum(-1) > 0).sum() == 2
