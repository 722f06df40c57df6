"""Test-only ComfyUI node for the live browser test: a stand-in for the umT5 CLIP.

The real text encoder (CLIPLoader type "wan") is an 11 GB umT5-XXL that ComfyUI always builds at full
size, far too big and slow for a CPU test, and its 4096-wide output would not fit the tiny test DiT.
This CLIP has the same interface the Live node uses (``tokenize`` then ``encode_from_tokens_scheduled``,
returning a CONDITIONING padded to 512 tokens with zeros after the prompt) and gives each text its own
64-wide embedding, so prompt switches change the video.
"""

import hashlib

import torch

TEXT_DIM = 64  # the tiny DiT preset's text width
TOKENS = 8


class _TinyCLIP:
    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens):
        seed = int.from_bytes(hashlib.sha256(tokens["text"].encode()).digest()[:4], "little")
        emb = torch.zeros(1, 512, TEXT_DIM)
        emb[:, :TOKENS] = 0.2 * torch.randn(
            1, TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(seed)
        )
        return [[emb, {"pooled_output": None}]]


class RFE2ETinyCLIP:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (_TinyCLIP(),)


NODE_CLASS_MAPPINGS = {"RFE2ETinyCLIP": RFE2ETinyCLIP}
