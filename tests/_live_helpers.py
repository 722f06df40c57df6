"""Small real pieces for the live-mode tests: tiny DiT stream, small random TAEHV, prompt encoder."""

from __future__ import annotations

import hashlib
import importlib

import torch
from conftest import load_pack

from rf_core.config import StreamConfig
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt, randomize_
from rf_core.vae.stream_decode import TAEHVStreamDecoder
from rf_core.vae.taehv import TAEHV, TAEHVConfig

LATENT_HW = (4, 4)  # 32x32 frames
CONFIG = StreamConfig(denoise_steps=(1000.0, 500.0))  # two steps keep the tests quick on 2 CPU cores

_MODEL = None


def live_module(name: str):
    """A module of the pack's ``nodes`` package (the pack is imported as ComfyUI would, by path)."""
    load_pack()
    return importlib.import_module(f"rf_pack.nodes.{name}")


def tiny_model():
    global _MODEL
    if _MODEL is None:
        _MODEL = random_model("tiny", seed=3)
    return _MODEL


def encode(text: str) -> torch.Tensor:
    """A deterministic stand-in for the text encoder: distinct embeddings per text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return random_prompt("tiny", tokens=8, seed=seed)


def stream(prompt: str = "a cat", seed: int = 7) -> StreamSession:
    return StreamSession(tiny_model(), encode(prompt), LATENT_HW, CONFIG, seed=seed)


def taehv_decoder() -> TAEHVStreamDecoder:
    return TAEHVStreamDecoder(randomize_(TAEHV(TAEHVConfig(widths=(12, 8, 6, 4))), seed=5).eval())


class SpyDecoder:
    """The real decoder, recording the latent chunks it was given and the frames it returned."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.latents: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        self.latents.append(z.clone())
        out = self.inner.decode_chunk(z)
        self.outputs.append(out.clone())
        return out

    def reset(self) -> None:
        self.inner.reset()
