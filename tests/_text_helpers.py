"""Tiny stand-ins for the umT5 tokenizer and encoder files (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "cat", "dog", "runs", "on", "the", "grass", "red", "&", "b", "c"]
# Word "▁w" has id 3 + WORDS.index(w): pad 0, EOS 1, unk 2 as in umT5.
WORD_ID = {w: 3 + i for i, w in enumerate(WORDS)}


def build_tiny_tokenizer(path: Path, with_eos: bool = True) -> Path:
    """A SentencePiece-style Unigram tokenizer.json with umT5's special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = [("<pad>", 0.0), ("</s>" if with_eos else "<s>", 0.0), ("<unk>", 0.0)]
    pieces = [("\u2581" + w, -1.0) for w in WORDS] + [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(specials + pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def random_umt5_state(cfg, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Wan's key names, scaled so activations stay O(1)."""
    from rf_core.text.umt5 import UMT5Encoder

    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = UMT5Encoder(cfg).state_dict()
    state = {}
    for key, meta in names.items():
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            t = 1.0 + 0.1 * torch.randn(meta.shape, generator=g)
        elif key.endswith("pos_embedding.embedding.weight"):
            t = torch.randn(meta.shape, generator=g)
        elif key == "token_embedding.weight":
            t = torch.randn(meta.shape, generator=g)
        else:
            t = torch.randn(meta.shape, generator=g) / meta.shape[1] ** 0.5
        state[key] = t.to(dtype)
    return state


def wan_to_comfy(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The same weights under ComfyUI / Hugging Face T5 names (written out by hand for the test)."""
    out = {prefix + "shared.weight": state["token_embedding.weight"]}
    out[prefix + "encoder.final_layer_norm.weight"] = state["norm.weight"]
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b, c = f"blocks.{i}.", f"{prefix}encoder.block.{i}."
        out[c + "layer.0.layer_norm.weight"] = state[b + "norm1.weight"]
        for p in "qkvo":
            out[c + f"layer.0.SelfAttention.{p}.weight"] = state[b + f"attn.{p}.weight"]
        out[c + "layer.0.SelfAttention.relative_attention_bias.weight"] = state[
            b + "pos_embedding.embedding.weight"
        ]
        out[c + "layer.1.layer_norm.weight"] = state[b + "norm2.weight"]
        out[c + "layer.1.DenseReluDense.wi_0.weight"] = state[b + "ffn.gate.0.weight"]
        out[c + "layer.1.DenseReluDense.wi_1.weight"] = state[b + "ffn.fc1.weight"]
        out[c + "layer.1.DenseReluDense.wo.weight"] = state[b + "ffn.fc2.weight"]
        i += 1
    return out
