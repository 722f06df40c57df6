"""Prompt-embedding files: round trip, metadata, width checks, the Wan negative prompt."""

from __future__ import annotations

import json

import pytest
import torch
from _text_helpers import build_tiny_tokenizer, random_umt5_state
from safetensors import safe_open
from safetensors.torch import save_file

from rf_core.text import (
    NEGATIVE_PROMPT_NAME,
    UMT5_TINY,
    WAN_NEGATIVE_PROMPT,
    PromptEmbedding,
    PromptEmbeddingError,
    TextEncoder,
    UMT5Encoder,
    UMT5Tokenizer,
    encode_prompt_embeddings,
    load_prompt_embeddings,
    save_prompt_embeddings,
)


def _entries(dim=64, length=16):
    pos = torch.randn(length, dim, dtype=torch.bfloat16)
    pos[5:] = 0
    neg = torch.randn(1, length, dim)  # a batch of one is accepted and stored as [L, D]
    return {
        "cat": PromptEmbedding("a cat on the grass", pos),
        NEGATIVE_PROMPT_NAME: PromptEmbedding(WAN_NEGATIVE_PROMPT, neg),
    }


def test_round_trip_keeps_values_dtypes_prompts_and_metadata(tmp_path):
    path = tmp_path / "prompts.safetensors"
    entries = _entries()
    save_prompt_embeddings(path, entries, encoder_name="umt5-xxl-enc-bf16")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_prompt_embeddings(path, dim=64)
    assert loaded.encoder_name == "umt5-xxl-enc-bf16"
    assert set(loaded.entries) == {"cat", NEGATIVE_PROMPT_NAME}
    assert loaded["cat"].prompt == "a cat on the grass"
    assert loaded[NEGATIVE_PROMPT_NAME].prompt == WAN_NEGATIVE_PROMPT
    assert loaded["cat"].embeds.dtype == torch.bfloat16
    assert torch.equal(loaded["cat"].embeds, entries["cat"].embeds)
    assert torch.equal(loaded[NEGATIVE_PROMPT_NAME].embeds, entries[NEGATIVE_PROMPT_NAME].embeds[0])
    assert loaded.batch(["cat", "cat"]).shape == (2, 16, 64)
    with pytest.raises(KeyError, match=r"'dog'.*\['cat', 'negative'\]"):
        loaded["dog"]
    # Metadata is readable by other tools too.
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["entries"])["cat"]
    assert info == {"prompt": "a cat on the grass", "dtype": "bfloat16", "shape": [16, 64]}
    cast = load_prompt_embeddings(path, dim=64, dtype=torch.float32)["cat"].embeds
    assert cast.dtype == torch.float32 and torch.equal(cast, entries["cat"].embeds.float())


def test_width_and_length_mismatch_errors(tmp_path):
    path = tmp_path / "small.safetensors"
    save_prompt_embeddings(path, _entries(dim=64), encoder_name="tiny")
    with pytest.raises(
        PromptEmbeddingError, match=r"small\.safetensors: entry '\w+' has width 64, expected 4096"
    ):
        load_prompt_embeddings(path)  # default: the DiT's text_dim 4096
    with pytest.raises(PromptEmbeddingError, match=r"has 16 tokens, expected 512"):
        load_prompt_embeddings(path, dim=64, length=512)


def test_foreign_and_inconsistent_files_are_rejected(tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(PromptEmbeddingError, match=r"model\.safetensors: not a prompt-embedding file"):
        load_prompt_embeddings(other)
    lying = tmp_path / "lying.safetensors"
    meta = {"cat": {"prompt": "x", "dtype": "float32", "shape": [4, 8]}}
    save_file(
        {"cat": torch.zeros(4, 9)},
        str(lying),
        metadata={"format": "reward-forcing/prompt-embeddings", "version": "1", "entries": json.dumps(meta)},
    )
    with pytest.raises(PromptEmbeddingError, match=r"'cat' has shape \[4, 9\], metadata says \[4, 8\]"):
        load_prompt_embeddings(lying, dim=None)
    with pytest.raises(ValueError, match=r"'bad' must be \[L, D\]"):
        save_prompt_embeddings(
            tmp_path / "x.safetensors", {"bad": PromptEmbedding("p", torch.zeros(2, 3, 4))}, "e"
        )


def test_encoded_prompts_round_trip_with_zero_tail(tmp_path):
    model = UMT5Encoder(UMT5_TINY).eval()
    model.load_state_dict(random_umt5_state(UMT5_TINY))
    encoder = TextEncoder(UMT5Tokenizer(build_tiny_tokenizer(tmp_path / "tok.json"), max_length=32), model)
    entries = encode_prompt_embeddings(encoder, {"cat": "a cat runs", NEGATIVE_PROMPT_NAME: "red dog"})
    path = tmp_path / "enc.safetensors"
    save_prompt_embeddings(path, entries, encoder.name)
    loaded = load_prompt_embeddings(path, dim=UMT5_TINY.dim, length=32)
    cat = loaded["cat"].embeds
    assert cat.shape == (32, UMT5_TINY.dim)
    assert (cat[:4].abs().sum(-1) > 0).all() and (cat[4:] == 0).all()  # 3 words + EOS
    neg = loaded[NEGATIVE_PROMPT_NAME].embeds
    assert (neg[:3].abs().sum(-1) > 0).all() and (neg[3:] == 0).all()


def test_wan_negative_prompt_constant():
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清，字幕")
    assert WAN_NEGATIVE_PROMPT.endswith("三条腿，背景人很多，倒着走")
    assert len(WAN_NEGATIVE_PROMPT) == 137 and WAN_NEGATIVE_PROMPT.count("，") == 27  # 28 phrases
