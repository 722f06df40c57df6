"""Prompts in, ``[B, 512, 4096]`` embeddings out: the tokenizer and the umT5 encoder together."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rf_core.text.tokenizer import UMT5Tokenizer
from rf_core.text.umt5 import UMT5Encoder
from rf_core.text.umt5_checkpoint import load_umt5


class TextEncoder:
    """Holds a :class:`UMT5Tokenizer` and a :class:`UMT5Encoder`; ``name`` is recorded in embedding files."""

    def __init__(self, tokenizer: UMT5Tokenizer, encoder: UMT5Encoder, name: str = "umt5-xxl") -> None:
        vocab = encoder.config.vocab_size
        if tokenizer.tokenizer.get_vocab_size() > vocab:
            raise ValueError(
                f"tokenizer has {tokenizer.tokenizer.get_vocab_size()} tokens but the encoder's "
                f"embedding has only {vocab} rows"
            )
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.name = name

    @classmethod
    def from_files(
        cls,
        tokenizer_path: str | Path,
        encoder_path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_length: int = 512,
    ) -> TextEncoder:
        tokenizer = UMT5Tokenizer(tokenizer_path, max_length=max_length)
        encoder = load_umt5(encoder_path, device=device, dtype=dtype)
        return cls(tokenizer, encoder, name=Path(encoder_path).name)

    @property
    def dim(self) -> int:
        return self.encoder.config.dim

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, max_length, dim]`` in the encoder's dtype and device; rows after EOS are 0."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        ids, mask = self.tokenizer(prompts)
        device = self.encoder.token_embedding.weight.device
        # no_grad rather than inference_mode: the embeddings may later enter a training graph.
        with torch.no_grad():
            return self.encoder(ids.to(device), mask.to(device))
