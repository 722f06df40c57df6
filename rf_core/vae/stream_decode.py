"""Chunk-by-chunk video decoding with the decoder state carried between chunks.

Contract with the generation engine:

- input: one latent chunk in model space (normalised), frame-major ``[B, n, 16, h, w]``;
- output: float frames ``[B, F, 3, 8h, 8w]`` in [0, 1], ``F = 1 + 4(n - 1)`` for the first
  chunk of a stream and ``4n`` afterwards, so a stream of T latents gives ``1 + 4(T - 1)``
  frames whatever the chunking, identical to decoding the whole latent video at once.

Only the decoder state is kept between chunks (a few frames per layer), never the video.
"""

from typing import Protocol

import torch

from rf_core.vae.latent_format import LATENT_CHANNELS
from rf_core.vae.taehv import TAEHV
from rf_core.vae.wan_layers import CausalCache
from rf_core.vae.wan_vae import WanVAE


class StreamDecoder(Protocol):
    frames_decoded: int

    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor: ...

    def reset(self) -> None: ...


class _StreamShape:
    """Remembers a stream's batch size and latent size so that mixed-up chunks are caught."""

    def __init__(self) -> None:
        self.shape: tuple[int, int, int] | None = None

    def check(self, z: torch.Tensor, who: str) -> None:
        if z.ndim != 5 or z.shape[2] != LATENT_CHANNELS or z.shape[1] < 1:
            raise ValueError(
                f"{who}.decode_chunk: expected model-space latents [B, n>=1, {LATENT_CHANNELS}, h, w], "
                f"got shape {list(z.shape)}"
            )
        shape = (z.shape[0], z.shape[3], z.shape[4])
        if self.shape is not None and shape != self.shape:
            raise ValueError(
                f"{who}.decode_chunk: chunk has batch/height/width {shape} but the stream has {self.shape};"
                " call reset() to start a new stream"
            )
        self.shape = shape


def _to_unit_frames(frames: torch.Tensor, out_dtype: torch.dtype, signed: bool) -> torch.Tensor:
    """``[B, F, C, H, W]`` decoder output → contiguous frames in [0, 1].

    ``signed``: the decoder's range is [-1, 1] (Wan): clamp, then ``x * 0.5 + 0.5`` as the
    reference does; otherwise the range is [0, 1] (TAEHV) and only the clamp applies.
    """
    out = frames.new_empty(frames.shape, dtype=out_dtype).copy_(frames)  # one copy: cast + contiguous
    if signed:
        return out.clamp_(-1.0, 1.0).mul_(0.5).add_(0.5)
    return out.clamp_(0.0, 1.0)


class WanStreamDecoder:
    """Streams the Wan 2.1 VAE decoder, keeping its per-layer causal cache between chunks.

    ``latents_per_step`` splits a chunk into smaller decoder passes to lower peak memory
    (the result does not change); ``None`` decodes each chunk in one pass.
    """

    def __init__(
        self, vae: WanVAE, *, latents_per_step: int | None = None, out_dtype: torch.dtype = torch.float32
    ) -> None:
        self.vae = vae
        self.latents_per_step = latents_per_step
        self.out_dtype = out_dtype
        self._cache = CausalCache()
        self._shape = _StreamShape()
        self.frames_decoded = 0

    def reset(self) -> None:
        """Forget the stream; the next chunk starts a new video."""
        self._cache.clear()
        self._shape = _StreamShape()
        self.frames_decoded = 0

    def cache_elements(self) -> int:
        """Number of elements held in the causal cache (a measure of the state's size)."""
        return self._cache.num_elements()

    def cache_storage_bytes(self) -> int:
        """Bytes of storage the causal cache keeps alive: its elements' bytes unless a history is a
        view of a bigger buffer (see ``wan_layers.last_frames``)."""
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._cache.history.values()
        }
        return sum(storages.values())

    @torch.no_grad()
    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        self._shape.check(z, type(self).__name__)
        latents = z.transpose(1, 2)  # [B, 16, n, h, w], the VAE's layout
        n = latents.shape[2]
        step = self.latents_per_step or n
        pieces = [self.vae.decode_step(latents[:, :, i : i + step], self._cache) for i in range(0, n, step)]
        frames = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
        out = _to_unit_frames(frames.transpose(1, 2), self.out_dtype, signed=True)
        self.frames_decoded += out.shape[1]
        return out


class TAEHVStreamDecoder:
    """Streams the TAEHV tiny decoder, keeping each MemBlock's last input between chunks.

    The first ``frames_to_trim`` (3) frames of a stream are startup frames and are dropped.
    """

    def __init__(self, taehv: TAEHV, *, out_dtype: torch.dtype = torch.float32) -> None:
        self.taehv = taehv
        self.out_dtype = out_dtype
        self._memory: dict[int, torch.Tensor] = {}
        self._shape = _StreamShape()
        self.frames_decoded = 0

    def reset(self) -> None:
        """Forget the stream; the next chunk starts a new video."""
        self._memory = {}
        self._shape = _StreamShape()
        self.frames_decoded = 0

    @torch.no_grad()
    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        self._shape.check(z, type(self).__name__)
        frames = self.taehv.decode_step(z, self._memory)  # [B, 4n, 3, H, W]
        if self.frames_decoded == 0:
            frames = frames[:, self.taehv.config.frames_to_trim :]
        out = _to_unit_frames(frames, self.out_dtype, signed=False)
        self.frames_decoded += out.shape[1]
        return out
