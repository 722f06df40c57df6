"""Wan 2.1 latent statistics and conversion between the engine's and ComfyUI's latent layouts.

The engine works in *model space*: latents normalised per channel, ``(raw - mean) / std``, and
frame-major ``[B, T, 16, h, w]``. A ComfyUI ``LATENT`` for Wan 2.1 holds *raw VAE space*
latents, channel-major ``[B, 16, T, h, w]`` in float32 (``comfy.latent_formats.Wan21``,
``scale_factor`` 1.0).
"""

import torch

LATENT_CHANNELS = 16

# Per-channel mean and standard deviation of the Wan 2.1 VAE latent (Wan2.1 `vae.py`, ComfyUI `Wan21`).
LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def latent_stats(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` as 1-D tensors of 16 values."""
    mean = torch.tensor(LATENT_MEAN, device=device, dtype=dtype)
    std = torch.tensor(LATENT_STD, device=device, dtype=dtype)
    return mean, std


def _check_layout(z: torch.Tensor, channel_dim: int, name: str) -> None:
    if z.ndim != 5 or z.shape[channel_dim] != LATENT_CHANNELS:
        layout = "[B, T, 16, h, w]" if channel_dim == 2 else "[B, 16, T, h, w]"
        raise ValueError(f"{name}: expected a {layout} latent, got shape {list(z.shape)}")


def to_comfy_latent(z: torch.Tensor) -> torch.Tensor:
    """Model-space ``[B, T, 16, h, w]`` → ComfyUI raw VAE space ``[B, 16, T, h, w]`` float32.

    Same as ``Wan21().process_out`` after a permute: ``x * std + mean``. Stays on z's device.
    """
    _check_layout(z, 2, "to_comfy_latent")
    mean, std = latent_stats(z.device)
    raw = z.float() * std.view(1, 1, -1, 1, 1) + mean.view(1, 1, -1, 1, 1)
    return raw.permute(0, 2, 1, 3, 4).contiguous()


def from_comfy_latent(latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI raw VAE space ``[B, 16, T, h, w]`` → model-space ``[B, T, 16, h, w]`` float32.

    Same as ``Wan21().process_in`` before a permute: ``(x - mean) / std``.
    """
    _check_layout(latent, 1, "from_comfy_latent")
    mean, std = latent_stats(latent.device)
    z = (latent.float() - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    return z.permute(0, 2, 1, 3, 4).contiguous()
