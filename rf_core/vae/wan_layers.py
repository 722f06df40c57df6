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
from collections.abc import Callable

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
            cache.history[self] = last_frames(x, self.context)
        return super().forward(x)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def last_frames(x: torch.Tensor, n: int, memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """A compact copy of the last ``n`` frames of ``x``, in ``memory_format`` (default: x's layout).

    The memory format is explicit on purpose: a plain ``.clone()`` of a dense slice keeps the
    slice's strides, and Inductor then removes it as a no-op, so a compiled graph returns a view
    that keeps the whole (padded) input alive in the cache. The compact copy has other strides
    (the batch stride), which Inductor keeps as a real copy.
    """
    return x[:, :, -n:].clone(memory_format=memory_format or memory_format_of(x))


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
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format_of(like))


def zero_history(conv: CausalConv3d, like: torch.Tensor) -> torch.Tensor:
    """The history a stream starts from: ``conv.context`` zero frames shaped and laid out like ``like``."""
    b, _, _, h, w = like.shape
    return _empty_like_layout((b, conv.in_channels, conv.context, h, w), like).zero_()


def interleave_time_pairs(y: torch.Tensor) -> torch.Tensor:
    """``[B, 2C, T, H, W]`` → ``[B, C, 2T, H, W]``: channels [0, C) are the earlier frame of each
    pair, [C, 2C) the later one (Wan's temporal upsampling)."""
    b, c2, t, h, w = y.shape
    c = c2 // 2
    doubled = _empty_like_layout((b, c, 2 * t, h, w), y)
    doubled[:, :, 0::2] = y[:, :c]
    doubled[:, :, 1::2] = y[:, c:]
    return doubled


# Nearest 2x then a 3-tap kernel, seen from the low-resolution input: the output row 2i + a
# reads input rows i - 1 + a and i + a, with the taps that land on each row summed
# (a = 0: W[0] | W[1] + W[2]; a = 1: W[0] + W[1] | W[2]). Indexed [a, tap of the 2x2, tap of the 3x3].
_PHASE_FOLD = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def fold_subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernel ``[Cout, Cin, 3, 3]`` applied after a nearest 2x upsampling → the 2x2 kernels of
    its four output phases, ``[4 * Cout, Cin, 1, 2, 2]`` ordered (row phase a, column phase b, Cout).

    Folded in at least float32 and rounded once to the weight's dtype.
    """
    cout, cin = weight.shape[:2]
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    fold = torch.tensor(_PHASE_FOLD, dtype=w.dtype, device=w.device)
    phases = torch.einsum("ark,oikl,bsl->aboirs", fold, w, fold).reshape(4 * cout, cin, 1, 2, 2)
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return phases.to(weight.dtype).contiguous(memory_format=fmt)


def subpixel_upsample(x: torch.Tensor, phase_weight: torch.Tensor, phase_bias: torch.Tensor) -> torch.Tensor:
    """Nearest 2x in space followed by a 3x3 conv (padding 1), without building the 4x-sized input.

    One 2x2 conv over the input zero-padded by 1 gives all four phases at (H + 1) x (W + 1);
    phase (a, b) of low-resolution pixel (i, j) is that output at (i + a, j + b) and lands at
    (2i + a, 2j + b). The output keeps the input's memory layout.
    """
    b, _, t, h, w = x.shape
    cout = phase_weight.shape[0] // 4
    phases = F.conv3d(x, phase_weight, phase_bias, padding=(0, 1, 1))
    out = _empty_like_layout((b, cout, t, 2 * h, 2 * w), x)
    grid = out.unflatten(4, (w, 2)).unflatten(3, (h, 2))  # [B, C, T, h, a, w, b]
    for a in (0, 1):
        for c in (0, 1):
            p = 2 * a + c
            grid[:, :, :, :, a, :, c] = phases[:, p * cout : (p + 1) * cout, :, a : a + h, c : c + w]
    return out


class Upsample(nn.Module):
    """Decoder resampling: nearest 2x in space + 3x3 conv halving the channels; optionally 2x in time.

    The spatial part runs as a sub-pixel convolution (:func:`subpixel_upsample`) with weights
    folded from ``resample.1.weight``, the stored parameter. The temporal part (``time_conv``,
    mode ``upsample3d``) turns each frame into two, except the very first frame of a stream,
    which is passed through unchanged; the frames after it are convolved with a zero history
    (the first frame is never part of it).
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # Index 0 held the parameter-free nearest upsampler in the original; kept for `resample.1.*`.
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def phase_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Folded weight and bias for :func:`subpixel_upsample`, cached until the parameters change.

        Folding costs a few small kernels, so it is simply redone where a change could go unseen:
        inside compiled graphs, for autograd, and for inference tensors (ComfyUI loads models under
        ``torch.inference_mode``), which have no version counter.
        """
        conv = self.resample[1]
        weight, bias = conv.weight, conv.bias
        if (
            torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and weight.requires_grad)
            or weight.is_inference()
            or bias.is_inference()
        ):
            return fold_subpixel_weight(weight), bias.repeat(4)
        # In-place updates bump _version; .to() and load_state_dict(assign=True) change the storage.
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device, p.stride()) for p in (weight, bias))
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, fold_subpixel_weight(weight), bias.repeat(4))
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.time_conv is not None:
            x = self.double_time(
                x, cache, lambda frames: interleave_time_pairs(self.time_conv(frames, cache))
            )
        return subpixel_upsample(x, *self.phase_weights())

    def double_time(
        self,
        x: torch.Tensor,
        cache: CausalCache | None,
        pairs: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Temporal 2x around ``pairs`` (frames → doubled frames, carrying the time conv's history):
        the stream's first frame bypasses it."""
        first = None
        if cache is None or self not in cache.started:
            first, x = x[:, :, :1], x[:, :, 1:]
            if cache is not None:
                cache.started.add(self)
        if x.shape[2] > 0:
            x = pairs(x)
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
            cache.history[self] = last_frames(x, 1)
        y = self.time_conv(x) if x.shape[2] >= 3 else x[:, :, :0]
        return y if first is None else torch.cat([first, y], dim=2)
