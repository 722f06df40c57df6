"""A tiny Wan VAE for the decoder tests."""

from __future__ import annotations

import torch

from rf_core.vae.wan_vae import WanVAE, WanVAEConfig


def tiny_vae(dtype: torch.dtype = torch.float32, seed: int | None = None) -> WanVAE:
    """dim=8 VAE whose norm gains and biases are random too (all-ones gains hide shape mistakes)."""
    if seed is not None:
        torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig(dim=8))
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return vae.to(dtype).eval().requires_grad_(False)
