"""Decoding that overlaps generation: chunk c is decoded on a side CUDA stream while the DiT makes
chunk c + 1, and its frames (and, if asked, its latents) reach the host without stalling the main
stream.

On CPU everything runs in order; results are the same either way.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

import torch

from rf_core.io.video import round_to_uint8

FRAME_DTYPES = (torch.uint8, torch.float32)


@dataclass(frozen=True)
class DecodedChunk:
    """One chunk on the host. frames: ``[B, F, H, W, 3]`` (uint8, or float32 in [0, 1]); None without
    a decoder. latents: the chunk's model-space latents, float32 ``[B, n, 16, h, w]``, when kept."""

    frames: torch.Tensor | None
    latents: torch.Tensor | None


class AsyncDecoder:
    """Wraps a streaming decoder (``decode_chunk(z) -> [B, F, 3, H, W]`` in [0, 1]), or None.

    ``submit(z)`` queues a chunk; ``pop()`` returns the oldest queued chunk, waiting only for that
    chunk's work; ``result()`` is ``pop().frames``. A decoder with a ``prepare(z)`` method gets it
    called on the caller's stream before the decode is queued on the side stream: weight loads (a
    memory manager moving models) then stay ordered with the main stream's work.

    frames_dtype: torch.uint8 (rounded as ``round_to_uint8``) or torch.float32 (as decoded).
    keep_latents: also bring each chunk's latents to the host (as float32).
    """

    def __init__(
        self,
        decoder,
        device: torch.device | str,
        frames_dtype: torch.dtype = torch.uint8,
        keep_latents: bool = False,
    ) -> None:
        if frames_dtype not in FRAME_DTYPES:
            raise ValueError(f"frames_dtype must be one of {FRAME_DTYPES}, got {frames_dtype}")
        self.decoder = decoder
        self.device = torch.device(device)
        self.frames_dtype = frames_dtype
        self.keep_latents = keep_latents
        self.cuda = self.device.type == "cuda"
        self.side = _side_stream(self.device) if self.cuda else None
        self.pending: deque = deque()

    def reset(self) -> None:
        self.drain()
        if self.decoder is not None:
            self.decoder.reset()

    def _host_frames(self, z: torch.Tensor) -> torch.Tensor | None:
        if self.decoder is None:
            return None
        rgb = self.decoder.decode_chunk(z)
        if self.frames_dtype == torch.uint8:
            rgb = round_to_uint8(rgb)
        return rgb.to(self.frames_dtype).permute(0, 1, 3, 4, 2)

    def submit(self, z: torch.Tensor) -> None:
        prepare = getattr(self.decoder, "prepare", None)
        if prepare is not None:
            prepare(z)
        if not self.cuda:
            frames = self._host_frames(z)
            latents = z.detach().to("cpu", torch.float32) if self.keep_latents else None
            self.pending.append(DecodedChunk(None if frames is None else frames.contiguous(), latents))
            return
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(
            main
        )  # z (and any weights just loaded) are complete before the side stream reads them
        z.record_stream(self.side)
        with torch.cuda.stream(self.side):
            frames = self._host_frames(z)
            copies = [frames] + ([z.detach().float()] if self.keep_latents else [])
            host = []
            for t in copies:
                if t is None:
                    host.append(None)
                    continue
                pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                pinned.copy_(t, non_blocking=True)
                host.append(pinned)
            done = torch.cuda.Event()
            done.record(self.side)
        latents = host[1] if self.keep_latents else None
        self.pending.append((DecodedChunk(host[0], latents), done))

    def pop(self) -> DecodedChunk:
        item = self.pending.popleft()
        if not self.cuda:
            return item
        chunk, done = item
        done.synchronize()
        # Out of page-locked memory: callers keep frames for long (ComfyUI IMAGE outputs, recordings),
        # and pinned host memory is scarce; the staging buffers go back to PyTorch's host cache.
        return DecodedChunk(*(None if t is None else t.clone() for t in (chunk.frames, chunk.latents)))

    def result(self) -> torch.Tensor:
        return self.pop().frames

    def drain(self) -> list[torch.Tensor]:
        return [self.result() for _ in range(len(self.pending))]


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One decode stream per device, so its memory pool is reused from stream to stream."""
    return torch.cuda.Stream(device)
