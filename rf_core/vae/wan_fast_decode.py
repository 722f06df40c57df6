"""The Wan 2.1 decoder run as pure tensor functions, each one compilable on its own.

Compiling ``Decoder3d.forward`` whole puts the :class:`~rf_core.vae.wan_layers.CausalCache`
bookkeeping (a dict keyed by modules, the first-frame logic of the temporal upsamplers) inside
the traced code. Here that bookkeeping stays in eager Python and only the tensor maths is
compiled: one function per kind of piece (residual block, temporal doubling, sub-pixel
upsampling, output head), taking the weights and the history frames as plain tensors. Graphs
depend on shapes only, so every block of the same shape shares one compiled graph.

A stream starts from zero histories, which is exactly the zero padding of the eager path, so
the first and the later passes run the same graphs. Inside each function the history concat
``cat([history, silu(norm(x))])`` is one buffer that Inductor can write the normalised
activations into directly; the new history is a compact copy of its last frames
(:func:`~rf_core.vae.wan_layers.last_frames`), so the buffer is freed inside the function.
"""

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from rf_core.vae.wan_layers import (
    AttentionBlock,
    CausalCache,
    CausalConv3d,
    ResidualBlock,
    Upsample,
    interleave_time_pairs,
    last_frames,
    memory_format_of,
    subpixel_upsample,
    zero_history,
)

# One graph per (function, input shape): at 480x832 a one-latent-per-pass stream needs 9 residual
# shapes, more than Dynamo's default limit of 8; whole-chunk passes need a few more.
RECOMPILE_LIMIT = 64


def _silu_norm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    # Same operations, in the same order, as RMSNorm followed by SiLU in the eager modules.
    return F.silu(F.normalize(x, dim=1) * math.sqrt(x.shape[1]) * gamma)


def causal_conv(
    x: torch.Tensor, history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad_hw: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal conv over ``[history, x]`` → (output, the input's last ``history``-many frames)."""
    frames = torch.cat([history, x], dim=2)
    # The new history keeps the old one's layout, so every pass sees the same input strides.
    new_history = last_frames(frames, history.shape[2], memory_format_of(history))
    return F.conv3d(frames, weight, bias, padding=(0, pad_hw, pad_hw)), new_history


def residual_step(
    x: torch.Tensor,
    history1: torch.Tensor,
    history2: torch.Tensor,
    gamma1: torch.Tensor,
    weight1: torch.Tensor,
    bias1: torch.Tensor,
    gamma2: torch.Tensor,
    weight2: torch.Tensor,
    bias2: torch.Tensor,
    shortcut_weight: torch.Tensor | None,
    shortcut_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`ResidualBlock` → (output, new history of conv 1, new history of conv 2)."""
    h, new1 = causal_conv(_silu_norm(x, gamma1), history1, weight1, bias1, 1)
    h, new2 = causal_conv(_silu_norm(h, gamma2), history2, weight2, bias2, 1)
    shortcut = x if shortcut_weight is None else F.conv3d(x, shortcut_weight, shortcut_bias)
    return h + shortcut, new1, new2


def head_step(
    x: torch.Tensor, history: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's output head (norm, SiLU, causal conv) → (video, new history)."""
    return causal_conv(_silu_norm(x, gamma), history, weight, bias, 1)


def double_time_step(
    x: torch.Tensor, history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal 2x of frames after the stream's first → (doubled frames, new history)."""
    y, new_history = causal_conv(x, history, weight, bias, 0)
    return interleave_time_pairs(y), new_history


class FastDecoderPath:
    """Runs a ``Decoder3d`` forward through the pure functions above, compiled or not.

    ``compile=False`` runs the same functions eagerly (useful to check them and to compare);
    ``mode`` and ``backend`` are torch.compile's (tests trace with ``backend="aot_eager"``, which
    skips Inductor's slow CPU code generation). ``frames_per_pass`` runs the blocks after the last
    temporal upsampler (the two largest resolutions) on that many frames at a time, carrying
    their causal state: same result, a smaller peak of activation memory.
    """

    def __init__(
        self,
        compile: bool = True,
        mode: str | None = None,
        backend: str = "inductor",
        frames_per_pass: int | None = None,
    ) -> None:
        if frames_per_pass is not None and frames_per_pass < 1:
            raise ValueError(f"frames_per_pass must be None or >= 1, got {frames_per_pass}")
        self.compiled = compile
        self.frames_per_pass = frames_per_pass

        def wrap(fn: Callable) -> Callable:
            if not compile:
                return fn
            return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode, backend=backend)

        self.residual = wrap(residual_step)
        self.head = wrap(head_step)
        self.double_time = wrap(double_time_step)
        self.upsample = wrap(subpixel_upsample)
        self.conv = wrap(causal_conv)

    def __call__(self, decoder, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        cache = cache if cache is not None else CausalCache()  # a whole video is a fresh stream
        blocks = (*decoder.middle, *decoder.upsamples)
        # Past the last temporal upsampler every frame is final, so they can go a few at a time.
        temporal = [i for i, b in enumerate(blocks) if isinstance(b, Upsample) and b.time_conv is not None]
        split = temporal[-1] + 1 if temporal else 0
        limit = (
            torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if self.compiled else nullcontext()
        )
        with limit:
            x = self._causal_conv(decoder.conv1, x, cache)
            for block in blocks[:split]:
                x = self._block(block, x, cache)
            pieces = [x] if self.frames_per_pass is None else list(x.split(self.frames_per_pass, dim=2))
            del x  # popped below, so that an unsplit input is freed after its first block
            outs = []
            while pieces:
                piece = pieces.pop(0)
                for block in blocks[split:]:
                    piece = self._block(block, piece, cache)
                norm, _, conv = decoder.head
                out, cache.history[conv] = self.head(
                    piece, _history(conv, piece, cache), norm.gamma, conv.weight, conv.bias
                )
                outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _block(self, block, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if isinstance(block, ResidualBlock):
            return self._residual(block, x, cache)
        if isinstance(block, Upsample):
            return self._upsample(block, x, cache)
        if isinstance(block, AttentionBlock):
            return block(x)  # no temporal state; a small share of the time
        raise TypeError(f"FastDecoderPath: unexpected decoder block {type(block).__name__}")

    def _causal_conv(self, conv: CausalConv3d, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        out, cache.history[conv] = self.conv(
            x, _history(conv, x, cache), conv.weight, conv.bias, conv.padding[1]
        )
        return out

    def _residual(self, block: ResidualBlock, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = block.residual
        shortcut = block.shortcut if isinstance(block.shortcut, CausalConv3d) else None
        out, cache.history[conv1], cache.history[conv2] = self.residual(
            x,
            _history(conv1, x, cache),
            _history(conv2, x, cache),
            norm1.gamma,
            conv1.weight,
            conv1.bias,
            norm2.gamma,
            conv2.weight,
            conv2.bias,
            None if shortcut is None else shortcut.weight,
            None if shortcut is None else shortcut.bias,
        )
        return out

    def _upsample(self, block: Upsample, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if block.time_conv is not None:
            conv = block.time_conv

            def pairs(frames: torch.Tensor) -> torch.Tensor:
                doubled, cache.history[conv] = self.double_time(
                    frames, _history(conv, frames, cache), conv.weight, conv.bias
                )
                return doubled

            x = block.double_time(x, cache, pairs)
        return self.upsample(x, *block.phase_weights())


def _history(conv: CausalConv3d, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    history = cache.history.get(conv)
    return zero_history(conv, x) if history is None else history
