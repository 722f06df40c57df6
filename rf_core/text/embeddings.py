"""Files of named prompt embeddings, so a session (or training) runs without the 11 GB encoder.

A file is a safetensors file with one ``[L, D]`` tensor per name and metadata recording, per name,
the prompt text, dtype and shape, plus the encoder that produced them. The negative prompt used by
training and CFG is stored like any other entry, conventionally under :data:`NEGATIVE_PROMPT_NAME`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# Wan's standard negative prompt (``wan_shared_cfg.sample_neg_prompt``), also Reward Forcing's
# training ``negative_prompt``.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
NEGATIVE_PROMPT_NAME = "negative"

_FORMAT = "reward-forcing/prompt-embeddings"
_VERSION = "1"


class PromptEmbeddingError(ValueError):
    """A prompt-embedding file that does not fit; the message names the file and the entry."""


@dataclass
class PromptEmbedding:
    """One prompt and its encoder output ``[L, D]`` (rows after EOS are zero)."""

    prompt: str
    embeds: torch.Tensor


@dataclass
class PromptEmbeddingFile:
    encoder_name: str
    entries: dict[str, PromptEmbedding]

    def __getitem__(self, name: str) -> PromptEmbedding:
        if name not in self.entries:
            raise KeyError(f"no prompt embedding named {name!r}; the file has {sorted(self.entries)}")
        return self.entries[name]

    def batch(self, names: Sequence[str]) -> torch.Tensor:
        """Stack the named entries into ``[B, L, D]`` (the DiT's context input)."""
        return torch.stack([self[n].embeds for n in names])


def encode_prompt_embeddings(encoder, prompts: Mapping[str, str]) -> dict[str, PromptEmbedding]:
    """Encode ``{name: prompt}`` with a :class:`~rf_core.text.text_encoder.TextEncoder`."""
    names = list(prompts)
    embeds = encoder.encode_prompts([prompts[n] for n in names])
    return {n: PromptEmbedding(prompts[n], embeds[i]) for i, n in enumerate(names)}


def save_prompt_embeddings(
    path: str | Path, entries: Mapping[str, PromptEmbedding], encoder_name: str
) -> None:
    """Write ``entries`` to ``path`` (atomically: a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for name, entry in entries.items():
        embeds = entry.embeds
        if embeds.ndim == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.ndim != 2:
            raise ValueError(
                f"prompt embedding {name!r} must be [L, D] or [1, L, D], got {list(embeds.shape)}"
            )
        tensors[name] = embeds.detach().to("cpu").contiguous()
        dtype_name = str(embeds.dtype).removeprefix("torch.")
        meta[name] = {"prompt": entry.prompt, "dtype": dtype_name, "shape": list(embeds.shape)}
    metadata = {"format": _FORMAT, "version": _VERSION, "encoder": encoder_name, "entries": json.dumps(meta)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_prompt_embeddings(
    path: str | Path,
    dim: int | None = 4096,
    length: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PromptEmbeddingFile:
    """Read a file written by :func:`save_prompt_embeddings`.

    ``dim`` (the DiT's ``text_dim``) and ``length`` (tokens, e.g. 512), when given, must match every
    entry; a mismatch raises :class:`PromptEmbeddingError` naming the file, the entry and both sizes.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PromptEmbeddingError(f"prompt-embedding file not found: {path}")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise PromptEmbeddingError(f"{path}: not a safetensors file: {err}") from err
    metadata = handle.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise PromptEmbeddingError(
            f"{path}: not a prompt-embedding file (metadata format {metadata.get('format')!r}, "
            f"expected {_FORMAT!r})"
        )
    meta = json.loads(metadata["entries"])
    if set(meta) != set(handle.keys()):
        raise PromptEmbeddingError(
            f"{path}: metadata lists {sorted(meta)} but the file holds tensors {sorted(handle.keys())}"
        )
    encoder_name = metadata.get("encoder", "")
    entries = {}
    for name, info in meta.items():
        t = handle.get_tensor(name)
        if list(t.shape) != info["shape"]:
            raise PromptEmbeddingError(
                f"{path}: entry {name!r} has shape {list(t.shape)}, metadata says {info['shape']}"
            )
        if dim is not None and t.shape[-1] != dim:
            raise PromptEmbeddingError(
                f"{path}: entry {name!r} has width {t.shape[-1]}, expected {dim} "
                f"(encoded with {encoder_name!r}; the model's text_dim must match)"
            )
        if length is not None and t.shape[0] != length:
            raise PromptEmbeddingError(f"{path}: entry {name!r} has {t.shape[0]} tokens, expected {length}")
        entries[name] = PromptEmbedding(info["prompt"], t.to(device=device or "cpu", dtype=dtype or t.dtype))
    return PromptEmbeddingFile(encoder_name, entries)
