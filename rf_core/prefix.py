"""Frames that open a stream (a start image, or a video being extended), made ready for the Wan VAE
encoder and ``StreamSession.prefill``: fitted to the stream's size and trimmed to 1 + 4k frames.

- Size: frames of another size are resized (bilinear, antialiased) to cover the stream's size and
  centre-cropped to it, so nothing is stretched; a note says what was done. A start image rarely has
  the stream's size, so refusing it would only send users to an image editor.
- Length: the Wan VAE encodes the first frame alone and every later latent from 4 frames, so it takes
  1 + 4k frames. A video of another length loses its first 1 to 3 frames, with a note; not its last
  ones, which the continuation must follow.

Frames are laid out as ComfyUI's IMAGE: ``[F, H, W, 3]``, float in [0, 1] or uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rf_core.vae.wan_vae import encodable_frames

_RESIZE_BATCH = 16  # frames resized at once: bounds the float copy of a long video


def _as_float(frames: torch.Tensor) -> torch.Tensor:
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def check_frames(frames: torch.Tensor, what: str) -> None:
    if (
        not isinstance(frames, torch.Tensor)
        or frames.ndim != 4
        or frames.shape[-1] < 3
        or frames.shape[0] < 1
    ):
        shape = list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{what}: expected frames [frames, height, width, 3], got {shape}")


def fit_frames(frames: torch.Tensor, width: int, height: int, what: str) -> tuple[torch.Tensor, str | None]:
    """``frames`` resized to cover ``width`` x ``height`` and centre-cropped to it: float32
    ``[F, height, width, 3]`` in [0, 1], and a note when the size changed (None otherwise)."""
    check_frames(frames, what)
    frames = frames[..., :3]
    h, w = frames.shape[1:3]
    if (w, h) == (width, height):
        return _as_float(frames), None
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    left, top = (rw - width) // 2, (rh - height) // 2
    out = torch.empty(frames.shape[0], height, width, 3)
    for i in range(0, frames.shape[0], _RESIZE_BATCH):
        x = _as_float(frames[i : i + _RESIZE_BATCH]).permute(0, 3, 1, 2)
        if (rw, rh) != (w, h):
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + x.shape[0]] = x[:, :, top : top + height, left : left + width].permute(0, 2, 3, 1)
    steps = []
    if (rw, rh) != (w, h):
        steps.append(f"resized to {rw}x{rh}")
    if (rw, rh) != (width, height):
        steps.append(f"centre-cropped to {width}x{height}")
    note = f"{what} is {w}x{h}, the video {width}x{height}: {' and '.join(steps)}"
    return out.clamp_(0, 1), note


def trim_frames(frames: torch.Tensor, what: str) -> tuple[torch.Tensor, str | None]:
    """The last 1 + 4k frames of ``frames``, and a note when some were left out."""
    n = frames.shape[0]
    keep = encodable_frames(n)
    if keep == n:
        return frames, None
    dropped = n - keep
    note = (
        f"{what} has {n} frames; the Wan VAE encodes 1 + 4k, so its first {dropped} "
        f"frame{'s' if dropped > 1 else ''} {'are' if dropped > 1 else 'is'} left out ({keep} kept)"
    )
    return frames[dropped:], note


def prefix_frames(frames: torch.Tensor, width: int, height: int, what: str) -> tuple[torch.Tensor, list[str]]:
    """Frames fitted to the stream's size and trimmed to 1 + 4k: float32 ``[1 + 4k, height, width, 3]``,
    and the notes saying what changed."""
    check_frames(frames, what)
    frames, trimmed = trim_frames(frames, what)  # first: no work on frames that are left out
    frames, fitted = fit_frames(frames, width, height, what)
    return frames, [n for n in (trimmed, fitted) if n]


def prefix_latent_frames(video_frames: int) -> int:
    """Latent frames of a prefix of ``video_frames`` (1 + 4k) frames."""
    return 1 + (video_frames - 1) // 4


def encode_prefix(vae, frames: torch.Tensor) -> torch.Tensor:
    """Model-space latents ``[1, T, 16, h, w]`` (CPU float32) of prefix frames ``[1 + 4k, H, W, 3]`` in
    [0, 1], with our Wan VAE (``rf_core.vae.wan_vae.WanVAE``)."""
    with torch.no_grad():
        return vae.encode_frames(frames.permute(0, 3, 1, 2)[None]).float().cpu()
