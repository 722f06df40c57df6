"""Building blocks of the Wan 2.1 video VAE, written for chunked causal processing.

Every temporal operation is causal, so a video can be pushed through in consecutive pieces of
any length as long as each layer keeps the tail of what it has seen. That tail lives in a
:class:`CausalCache` owned by the caller; passing ``cache=None`` means "this call holds the
whole video from its first frame".

Module attribute names and ``nn.Sequential`` indices follow the original checkpoint layout
(``residual.2.weight``, ``resample.1.weight``, ...), so state dicts load without renaming.
Tensors are ``[B, C, T, H, W]`` throughout; 2-D convolutions run as ``(1, k, k)`` 3-D
convolutions so that no layout shuffles are needed between layers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalCache:
    """Temporal state of one stream through an encoder or a decoder.

    ``history[layer]`` holds the last input frames a causal layer has seen; ``started`` records
    the resampling layers that have already passed the first frame of the stream through.
    An empty cache is the start of a new stream.
    """

    def __init__(self) -> None:
        self.history: dict[nn.Module, torch.Tensor] = {}
        self.started: set[nn.Module] = set()

    def clear(self) -> None:
        self.history.clear()
        self.started.clear()

    def num_elements(self) -> int:
        return sum(t.numel() for t in self.history.values())


class CausalConv3d(nn.Conv3d):
    """3-D convolution whose output at frame t sees input frames t-k+1 .. t only.

    The missing history is zeros at the start of a stream and the cached last ``k - 1`` input
    frames otherwise (for a single-frame input the cache keeps one older frame), which makes
    chunk-by-chunk processing identical to processing the whole video at once.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, padding=0) -> None:
        kernel_size = _triple(kernel_size)
        padding = _triple(padding)
        super().__init__(in_dim, out_dim, kernel_size, padding=(0, padding[1], padding[2]))
        # The original pads 2*p_t frames in front; for every kernel used (t=3, p=1 or t=1, p=0)
        # that is exactly the kernel's history of k_t - 1 frames.
        self.context = 2 * padding[0]

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.context == 0:
            return super().forward(x)
        history = cache.history.get(self) if cache is not None else None
        if history is None:
            x = F.pad(x, (0, 0, 0, 0, self.context, 0))
        else:
            x = torch.cat([history, x], dim=2)
        if cache is not None:
            cache.history[self] = x[:, :, -self.context :].clone()
        return super().forward(x)


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class RMSNorm(nn.Module):
    """L2-normalisation over channels times sqrt(C) and a learned gain (Wan's ``RMS_norm``)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        # gamma is [C, 1, 1] for 2-D (image) use and [C, 1, 1, 1] for video, as in the checkpoint.
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices 1, 4 (SiLU) and 5 (dropout, 0 in Wan) carry no weights; the layout is kept so
        # that the checkpoint keys residual.{0,2,3,6}.* line up.
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), cache)
        h = conv2(F.silu(norm2(h)), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention applied to every frame on its own, with a residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames))
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b * t, 1, h * w, 3 * c).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        out = self.proj(out)
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


def _conv2d_per_frame(conv: nn.Conv2d, x: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Apply a 2-D convolution to every frame of a [B, C, T, H, W] tensor without reshaping it."""
    return F.conv3d(
        x, conv.weight.unsqueeze(2), conv.bias, stride=(1, stride, stride), padding=(0, padding, padding)
    )


def _empty_like_layout(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    channels_last = like.is_contiguous(memory_format=torch.channels_last_3d) and not like.is_contiguous()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


class Upsample(nn.Module):
    """Decoder resampling: nearest 2x in space + 3x3 conv halving the channels; optionally 2x in time.

    The temporal part (``time_conv``, mode ``upsample3d``) turns each frame into two, except
    the very first frame of a stream, which is passed through unchanged; the frames after it
    are convolved with a zero history (the first frame is never part of it).
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # Index 0 held the parameter-free nearest upsampler in the original; kept for `resample.1.*`.
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_time(x, cache)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return _conv2d_per_frame(self.resample[1], x, padding=1)

    def _double_time(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        first = None
        if cache is None or self not in cache.started:
            first, x = x[:, :, :1], x[:, :, 1:]
            if cache is not None:
                cache.started.add(self)
        if x.shape[2] > 0:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache)
            # Output channels [0, C) are the earlier frame of each pair, [C, 2C) the later one.
            doubled = _empty_like_layout((b, c, 2 * t, h, w), y)
            doubled[:, :, 0::2] = y[:, :c]
            doubled[:, :, 1::2] = y[:, c:]
            x = doubled
        return x if first is None else torch.cat([first, x], dim=2)


class Downsample(nn.Module):
    """Encoder resampling: stride-2 3x3 conv in space (pad right/bottom); optionally stride 2 in time.

    The temporal part (mode ``downsample3d``) passes the first frame of a stream through and
    then applies a kernel-3, stride-2 conv over [previous frame, new frames], so every two new
    frames give one output (each later call must bring an even number of frames).
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # Index 0 held the parameter-free ZeroPad2d(0, 1, 0, 1) in the original; kept for `resample.1.*`.
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = _conv2d_per_frame(self.resample[1], F.pad(x, (0, 1, 0, 1)), stride=2)
        if self.time_conv is not None:
            x = self._halve_time(x, cache)
        return x

    def _halve_time(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        first = None
        if cache is None or self not in cache.started:
            first = x[:, :, :1]
            history, x = first, x[:, :, 1:]
            if cache is not None:
                cache.started.add(self)
        else:
            history = cache.history[self]
        if x.shape[2] % 2:
            raise ValueError(
                f"temporal downsampling needs an even number of frames after the first, got {x.shape[2]}"
                " (encode videos of 1 + 4k frames)"
            )
        x = torch.cat([history, x], dim=2)
        if cache is not None:
            cache.history[self] = x[:, :, -1:].clone()
        y = self.time_conv(x) if x.shape[2] >= 3 else x[:, :, :0]
        return y if first is None else torch.cat([first, y], dim=2)
