"""3D rotary position embedding of Wan2.1 (frame, row, column).

Head channels form complex pairs (2i, 2i+1). With c = head_dim / 2 complex channels, the first
c - 2(c//3) rotate with the frame position, the next c//3 with the row, the last c//3 with the column,
each with theta 10000. The reference computes this in float64 with complex numbers; we use the same
formula in real arithmetic, in float64 by default (parity) or float32 (speed path, bf16 models).
"""

from __future__ import annotations

import torch

THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Complex channels per axis (frame, row, column): 22/21/21 for head_dim 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _angles(positions: torch.Tensor, n_complex: int) -> torch.Tensor:
    """[len(positions), n_complex] angles pos * theta^(-2j / (2 n_complex)), float64."""
    dim = 2 * n_complex
    inv = 1.0 / torch.pow(THETA, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(positions.to(torch.float64), inv)


class RopeTables:
    """Cos/sin tables for token grids, cached per (first frame, frames, rows, cols, device, dtype)."""

    def __init__(self, head_dim: int, dtype: torch.dtype = torch.float64) -> None:
        self.head_dim = head_dim
        self.dtype = dtype
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, frame_start: int, frames: int, rows: int, cols: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [frames*rows*cols, 1, head_dim/2] for tokens in (f, h, w) row-major order."""
        key = (frame_start, frames, rows, cols, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if frame_start < 0:
            raise ValueError(f"negative RoPE frame position {frame_start}")
        cf, ch, cw = axis_dims(self.head_dim)
        af = _angles(torch.arange(frame_start, frame_start + frames), cf)
        ah = _angles(torch.arange(rows), ch)
        aw = _angles(torch.arange(cols), cw)
        ang = torch.cat(
            [
                af[:, None, None, :].expand(frames, rows, cols, cf),
                ah[None, :, None, :].expand(frames, rows, cols, ch),
                aw[None, None, :, :].expand(frames, rows, cols, cw),
            ],
            dim=-1,
        ).reshape(frames * rows * cols, 1, -1)
        out = (ang.cos().to(device, self.dtype), ang.sin().to(device, self.dtype))
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = out
        return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by the tables (computed in the tables' dtype, cast back to x's)."""
    xc = x.to(cos.dtype).unflatten(-1, (-1, 2))
    re, im = xc[..., 0], xc[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def frame_shift(
    head_dim: int, frames: int, device: torch.device | str, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [head_dim/2] rotating already-roped keys by ``frames`` frame positions (the row and
    column channels stay put): apply_rope(rope(k, p), *frame_shift(d, s)) = rope(k, p + s)."""
    cf, ch, cw = axis_dims(head_dim)
    ang = torch.cat([_angles(torch.tensor([frames]), cf)[0], torch.zeros(ch + cw, dtype=torch.float64)])
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)
