"""Random models for tests, demos and benchmarks (they make noise, not video).

Weights are drawn from a private generator (never the global RNG) with scales that keep activations
O(1), so numerical tests exercise every path with non-trivial values.
"""

from __future__ import annotations

import torch

from rf_core.config import DiTConfig, get_preset
from rf_core.model.dit import WanDiT


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
            vals = 1 + 0.1 * torch.randn(p.shape, generator=g, device=device)
        elif name.endswith("modulation"):
            vals = torch.randn(p.shape, generator=g, device=device) / p.shape[-1] ** 0.5
        elif p.ndim == 1:
            vals = 0.02 * torch.randn(p.shape, generator=g, device=device)
        else:
            fan_in = p[0].numel()
            vals = torch.randn(p.shape, generator=g, device=device) / fan_in**0.5
        p.copy_(vals.to(p.dtype))
    return model


def random_model(
    cfg: DiTConfig | str = "tiny",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_backend: str = "auto",
) -> WanDiT:
    """A ``WanDiT`` of the given preset/config with seeded random weights."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    with torch.device("meta"):
        model = WanDiT(cfg, attn_backend=attn_backend)
    model = model.to_empty(device=device)
    randomize_(model, seed)
    return model.to(dtype).eval().requires_grad_(False)


def random_prompt(
    cfg: DiTConfig | str = "tiny", batch: int = 1, tokens: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Random umT5-like embeddings [batch, text_len, text_dim] with zero rows after ``tokens``."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    g = torch.Generator().manual_seed(seed)
    emb = 0.2 * torch.randn((batch, cfg.text_len, cfg.text_dim), generator=g)
    n = cfg.text_len // 2 if tokens is None else tokens
    emb[:, n:] = 0
    return emb
