"""Cheap RGB previews of model-space Wan latents (when no decoder is connected)."""

from __future__ import annotations

import torch

# Linear map from the 16 normalised Wan 2.1 latent channels to RGB, then (x + 1) / 2. These are the
# Wan21 latent-preview factors ComfyUI uses for its own Latent2RGB previews.
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def latent_rgb(z: torch.Tensor, upscale: int = 8) -> torch.Tensor:
    """Model-space latents [B, n, 16, h, w] -> rough frames [B, n, 3, h*upscale, w*upscale] in [0, 1]."""
    factors = torch.tensor(WAN21_RGB_FACTORS, dtype=torch.float32, device=z.device)
    bias = torch.tensor(WAN21_RGB_BIAS, dtype=torch.float32, device=z.device)
    rgb = torch.einsum("bnchw,cr->bnrhw", z.float(), factors) + bias.view(1, 1, 3, 1, 1)
    rgb = ((rgb + 1) / 2).clamp(0, 1)
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, dim=-2).repeat_interleave(upscale, dim=-1)
    return rgb
