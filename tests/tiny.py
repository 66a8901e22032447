"""Helpers that build the PyTorch reference oracles: tiny diffusers/transformers models with random,
non-zero weights, saved with `save_pretrained` into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def randomize(module, seed: int = 0, scale: float = 0.05) -> None:
    """Perturb every parameter so zero-initialised layers (AdaLN-Zero, LoRA B, out convs) matter."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def save(module, folder: Path, **kwargs) -> Path:
    module.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def rel_err(ours, ref) -> float:
    """Max-abs error over max-abs reference (SPEC §1)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


class ProbsProcessor:
    """A diffusers attention processor that forms the softmax explicitly (Attend-and-Excite style)
    and records the head-mean probabilities of cross-attention calls: the reference maps."""

    def __init__(self, store: list, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        import torch

        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        b, length, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # [B*heads, L, S], explicit softmax
        if cross:
            self.store.append((self.name, probs.reshape(b, attn.heads, length, -1).mean(1).detach().numpy()))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


class JointProbsProcessor:
    """diffusers' `JointAttnProcessor2_0` with the softmax formed explicitly (the official TACA /
    gsn-factory pattern): image-query × text-key logits multiplied by `gamma` (a scalar or one value
    per sample) when set, and the head-mean probabilities of that block (`[B, L_img, T]` tensors)
    appended to `store` when one is given (detached, unless `detach=False`: the train-step benchmark
    differentiates through them)."""

    def __init__(self, store: list | None = None, gamma=None, detach: bool = True):
        self.store, self.gamma, self.detach = store, gamma, detach

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        import torch

        b, n_img, _ = hidden_states.shape

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # [B, N, L, D]

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            q, k, cq, ck = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        logits = q @ k.transpose(-1, -2) * attn.scale  # [B, N, L, L]
        if self.gamma is not None:
            gamma = torch.as_tensor(self.gamma, dtype=logits.dtype, device=logits.device).reshape(-1, 1, 1, 1)
            logits[:, :, :n_img, n_img:] = logits[:, :, :n_img, n_img:] * gamma
        probs = logits.softmax(-1)
        if self.store is not None:
            block = probs[:, :, :n_img, n_img:].mean(1)
            self.store.append(block.detach() if self.detach else block)
        out = (probs @ v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        img, txt = attn.to_out[0](out[:, :n_img]), out[:, n_img:]
        return img, (txt if attn.context_pre_only else attn.to_add_out(txt))


def record_cross_attention(unet) -> list:
    """Install `ProbsProcessor` on every attention layer of a diffusers UNet; returns the store."""
    store: list = []
    unet.set_attn_processor({name: ProbsProcessor(store, name) for name in unet.attn_processors})
    return store


def real_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer, offline (`ctcal_jax.tokenizers.clip_tokenizer`)."""
    from ctcal_jax.tokenizers import clip_tokenizer

    return clip_tokenizer(model_max_length, pad_token)


_T5_CORPUS = """A photo of a cat and a dog sitting on a red sofa.
A giraffe standing next to a traffic light in the city.
An astronaut riding a horse on the moon, digital art.
Two green apples and a banana on a wooden table.
The blue car is parked near an old house by the river.
A bowl of fruit, a cup of coffee and a book on the desk.
Three birds flying over the mountains at sunset; oil painting.
A small boat floating on a calm lake under the stars.
"""


def tiny_t5_tokenizer(folder: Path, vocab_size: int = 120):
    """A T5 tokenizer (SentencePiece unigram, T5's `<pad>`=0, `</s>`=1, `<unk>`=2, 100 sentinel ids)
    trained offline on a few sentences, saved to `folder` as `spiece.model` and loaded from there."""
    import io

    import sentencepiece as spm
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_T5_CORPUS.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return T5TokenizerFast.from_pretrained(folder)


def tag_words(lexicon: dict[str, str], prompt: str) -> list[tuple[str, str, int, int]]:
    """A dictionary tagger, `(word, UPOS, start, end)` per space-separated word (Stanza's models cannot
    be downloaded here): `functools.partial(tag_words, LEXICON)` is picklable, so grain's worker
    processes can run it."""
    out, pos = [], 0
    for word in prompt.split():
        start = prompt.index(word, pos)
        pos = start + len(word)
        out.append((word, lexicon.get(word, "X"), start, pos))
    return out


def model_cache(torch_class, configs: dict, tmp_path_factory):
    """`get(name) -> (torch model, folder, flax module, params)`: `torch_class(**configs[name])` with
    seeded random weights, saved and loaded back with `load_component`, built on first use."""
    from conversion import load_component

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            import torch

            torch.manual_seed(0)
            ref = torch_class(**configs[name]).eval()
            randomize(ref, seed=1)
            folder = save(ref, tmp_path_factory.mktemp(name))
            module, params = load_component(folder, "transformer")
            cache[name] = (ref, folder, module, params)
        return cache[name]

    return get

