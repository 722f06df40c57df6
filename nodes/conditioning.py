"""ComfyUI CONDITIONING <-> the DiT's prompt embeddings [B, text_len, text_dim].

CLIPTextEncode with umT5 gives ``[[tensor [1, >=512, 4096], {"pooled_output": None}]]`` with zero
rows after EOS and no truncation for long prompts; the DiT's cross-attention takes exactly
``text_len`` rows, so shorter sequences are zero-padded and longer ones cut (the reference's
tokenizer truncates at 512 tokens too).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("reward_forcing")


def prompt_embeds(conditioning, text_dim: int, text_len: int, what: str = "positive") -> torch.Tensor:
    """The embeddings of a CONDITIONING as float32 [B, text_len, text_dim] on the CPU."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(
            f"{what}: expected a CONDITIONING (e.g. from CLIPTextEncode), got {type(conditioning).__name__}"
        )
    if len(conditioning) > 1:
        raise ValueError(
            f"{what}: the CONDITIONING holds {len(conditioning)} entries (e.g. from Conditioning Combine); "
            "Reward Forcing takes one prompt: connect a single CLIPTextEncode (Conditioning Concat is fine)"
        )
    entry = conditioning[0]
    cond = entry[0] if isinstance(entry, (list, tuple)) else None
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
        shape = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"{what}: expected a [batch, tokens, width] conditioning tensor, got {shape}")
    if cond.shape[-1] != text_dim:
        raise ValueError(
            f"{what}: the conditioning is {cond.shape[-1]} wide but this model takes {text_dim}-wide umT5 "
            f"embeddings: load the text encoder with CLIPLoader type 'wan' (umt5_xxl) and encode with it"
        )
    cond = cond.detach().to("cpu", torch.float32)
    n = cond.shape[1]
    if n > text_len:
        if cond[:, text_len:].abs().amax() > 0:
            log.warning(
                "Reward Forcing: the prompt has more than %d tokens; the model sees the first %d",
                text_len,
                text_len,
            )
        cond = cond[:, :text_len]
    elif n < text_len:
        cond = F.pad(cond, (0, 0, 0, text_len - n))
    return cond.contiguous()


def repeat_prompts(embeds: torch.Tensor, batch: int) -> torch.Tensor:
    """Each prompt of [P, L, D] embeddings ``batch`` times in a row: [P * batch, L, D]."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    return embeds.repeat_interleave(batch, dim=0) if batch > 1 else embeds


def to_conditioning(embeds: torch.Tensor) -> list:
    """[B, L, D] embeddings as a CONDITIONING, shaped like CLIPTextEncode's output."""
    if embeds.ndim == 2:
        embeds = embeds[None]
    return [[embeds.to("cpu", torch.float32), {"pooled_output": None}]]
