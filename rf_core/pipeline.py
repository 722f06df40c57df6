"""Decoding that overlaps generation: chunk c is decoded on a side CUDA stream while the DiT makes
chunk c + 1, and its frames reach the host as uint8 without stalling the main stream.

On CPU everything runs in order; results are the same either way.
"""

from __future__ import annotations

from collections import deque

import torch

from rf_core.io.video import round_to_uint8


class AsyncDecoder:
    """Wraps a streaming decoder (``decode_chunk(z) -> [B, F, 3, H, W]`` in [0, 1]).

    ``submit(z)`` queues a chunk; ``result()`` returns the oldest queued chunk's frames as uint8
    ``[B, F, H, W, 3]`` on the CPU, waiting only for that chunk's decode.
    """

    def __init__(self, decoder, device: torch.device | str) -> None:
        self.decoder = decoder
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.pending: deque = deque()

    def reset(self) -> None:
        self.drain()
        self.decoder.reset()

    def submit(self, z: torch.Tensor) -> None:
        if not self.cuda:
            self.pending.append(
                round_to_uint8(self.decoder.decode_chunk(z)).permute(0, 1, 3, 4, 2).contiguous()
            )
            return
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)  # z is complete before the side stream reads it
        z.record_stream(self.side)
        with torch.cuda.stream(self.side):
            frames = round_to_uint8(self.decoder.decode_chunk(z)).permute(0, 1, 3, 4, 2)
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.side)
        self.pending.append((host, done))

    def result(self) -> torch.Tensor:
        item = self.pending.popleft()
        if not self.cuda:
            return item
        host, done = item
        done.synchronize()
        return host

    def drain(self) -> list[torch.Tensor]:
        return [self.result() for _ in range(len(self.pending))]
