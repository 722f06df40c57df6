"""A stream together with everything it produced: the engine session, its latents and decoded frames.

Stream Generate uses one for a single run; Stream Session keeps one per session id across queue runs.

A record may open with a prefix (a start image or a video being extended): its latents are prefilled
into the engine and kept as the record's first entry; its frames are the input's own, while the
decoder decodes its latents anyway, so that the first generated frames join them without a seam.

Consistency under Cancel: a chunk becomes part of the record only once ``StreamSession.next_chunk``
returned it (a cancelled chunk leaves the engine as it was, so the next run redoes that chunk).
Decoding is never interrupted half-way; if it fails anyway, the decoder is restarted and every
stored latent is decoded again on the next call, which reproduces the same frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from rf_core.io.video import round_to_uint8
from rf_core.pipeline import AsyncDecoder
from rf_core.stream import StreamSession

from ..comfy import Progress
from .previews import latent_rgb


class StreamDecoder(Protocol):
    """What the record needs from a decoder (rf_core's Wan VAE / TAEHV streams, or ComfyUI's VAE)."""

    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents [B, n, 16, h, w] -> frames [B, F, 3, H, W] in [0, 1]; continues the
        previous call's video."""

    def reset(self) -> None: ...


FrameSink = Callable[[torch.Tensor], None]  # receives each decoded chunk as [B, F, H, W, 3] in [0, 1]


class StreamRecord:
    """``frame_dtype``: torch.float32 keeps decoded frames exact (one-shot generation);
    torch.uint8 keeps long interactive sessions at a quarter of the memory."""

    def __init__(
        self,
        stream: StreamSession,
        decoder: StreamDecoder | None = None,
        frame_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.stream = stream
        self.decoder = decoder
        self.frame_dtype = frame_dtype
        # Called before every chunk: inside ComfyUI, loading the decoder may have offloaded the model.
        self.prepare: Callable[[], object] | None = None
        self.latents: list[torch.Tensor] = []  # model space, CPU float32, one [B, n, 16, h, w] per chunk
        self.frames: list[torch.Tensor] = []  # CPU [B, F, H, W, 3], one per decoded chunk
        self.frame_chunks: list[int] = []  # number of frames each decoded chunk gave
        self.opening: torch.Tensor | None = (
            None  # the prefix's own frames [B, F, H, W, 3], in place of its decode
        )

    # ------------------------------------------------------------------ generation
    @property
    def chunks(self) -> int:
        return len(self.latents)

    def passes_per_chunk(self) -> int:
        """Progress steps per chunk: the denoising passes (``StreamSession.on_pass``)."""
        return len(self.stream.timesteps)

    def prefill(
        self,
        latents: torch.Tensor,
        frames: torch.Tensor | None = None,
        progress: Progress | None = None,
        sink: FrameSink | None = None,
    ) -> None:
        """Open the stream with known latents (model space ``[B or 1, T, 16, h, w]``) instead of generated
        ones (``StreamSession.prefill``), and their ``frames`` ``[B or 1, F, H, W, 3]`` in [0, 1] (None:
        decoded from the latents). ``progress`` counts prefill chunks from 0; ``sink`` gets the frames."""
        if self.latents:
            raise ValueError("a prefix can only open a stream; this one has chunks already")
        batch = self.stream.batch

        def report(done: int, _total: int) -> None:
            if progress is not None:
                progress.update(-(-done // self.stream.config.chunk_frames))

        self.stream.prefill(latents, on_chunk=report)
        self.latents.append(
            latents.detach().to("cpu", torch.float32).expand(batch, -1, -1, -1, -1).contiguous()
        )
        if frames is not None:
            self.opening = frames.detach().to("cpu", torch.float32).expand(batch, -1, -1, -1, -1).contiguous()
        last = self.decode_pending(sink)
        if progress is not None and last is not None:
            progress.update(self.prefill_steps(latents.shape[1]), last[0, -1])

    def prefill_steps(self, latent_frames: int) -> int:
        """Progress steps of a prefill: one per prefill chunk (one model pass each)."""
        return -(-latent_frames // self.stream.config.chunk_frames)

    def advance(
        self,
        n_chunks: int,
        progress: Progress | None = None,
        sink: FrameSink | None = None,
        offset: int = 0,
    ) -> None:
        """Generate ``n_chunks`` more chunks, decode each as it arrives and hand its frames to ``sink``.
        ``progress`` counts model passes from ``offset`` to offset + n_chunks * passes_per_chunk.

        On CUDA chunk c is decoded on a side stream while the DiT makes chunk c + 1, and its frames,
        the preview and ``sink`` are handled on the host while the GPU works on; the first chunk is
        handled at once (its preview is the first thing the user sees). Cancel keeps every chunk the
        engine finished: chunks still decoding are waited for."""
        per = self.passes_per_chunk()
        self.decode_pending(sink)
        pipe = AsyncDecoder(self.decoder, self.stream.device, self.frame_dtype, keep_latents=True)
        shown = 0  # progress only moves forward: passes of chunk c + 1 are reported before chunk c is taken

        def report(value: int, preview: torch.Tensor | None = None) -> None:
            nonlocal shown
            shown = max(shown, value)
            if progress is not None:
                progress.update(offset + shown, preview)

        def take(deliver: bool = True) -> None:
            chunk = pipe.pop()
            self.latents.append(chunk.latents)
            if chunk.frames is not None:
                self.frames.append(_store(chunk.frames, self.frame_dtype))
                self.frame_chunks.append(chunk.frames.shape[1])
            if deliver:
                if sink is not None and chunk.frames is not None:
                    sink(chunk.frames)
                report(len(self.latents) * per - first * per, self._preview(chunk))

        first = len(self.latents)
        try:
            for i in range(n_chunks):
                self.stream.on_pass = lambda p, _n, i=i: report(i * per + p + 1)
                if self.prepare is not None:
                    self.prepare()
                z = self.stream.next_chunk()
                try:
                    pipe.submit(z)
                except BaseException:
                    while pipe.pending:
                        take(deliver=False)
                    self.latents.append(z.detach().to("cpu", torch.float32))
                    self.set_decoder(self.decoder)  # decoder state is unknown now: decode again later
                    raise
                if i == 0 or len(pipe.pending) > 1:
                    take()
            while pipe.pending:
                take()
        except BaseException:
            while pipe.pending:  # chunks the engine finished stay in the record
                take(deliver=False)
            raise
        finally:
            self.stream.on_pass = None

    def _preview(self, chunk) -> torch.Tensor:
        if chunk.frames is not None:
            frame = chunk.frames[0, -1]
            return frame.float() / 255.0 if frame.dtype == torch.uint8 else frame
        return latent_rgb(chunk.latents[:, -1:])[0, 0].permute(1, 2, 0)

    def decode_pending(self, sink: FrameSink | None = None) -> torch.Tensor | None:
        """Decode stored chunks that have no frames yet; returns the last chunk's frames [B, F, H, W, 3]."""
        if self.decoder is None:
            return None
        last = None
        try:
            while len(self.frames) < len(self.latents):
                i = len(self.frames)
                if i == 0 and self.opening is not None:
                    self._decode(self.latents[0], keep=False)  # primes the decoder for the next chunk
                    last = self.opening
                else:
                    last = self._decode(self.latents[i])
                if sink is not None:
                    sink(last)
                self.frames.append(_store(last, self.frame_dtype))
                self.frame_chunks.append(last.shape[1])
        except BaseException:
            self.set_decoder(self.decoder)  # decoder state is unknown now: decode everything again later
            raise
        return last

    def _decode(self, z: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
        """Frames [B, F, H, W, 3] of latents z, decoded a chunk at a time (a prefix may be long)."""
        step = self.stream.config.chunk_frames
        out = []
        for j in range(0, z.shape[1], step):
            rgb = self.decoder.decode_chunk(z[:, j : j + step])
            if keep:
                out.append(rgb.detach().permute(0, 1, 3, 4, 2).to("cpu", torch.float32))
        return torch.cat(out, dim=1) if keep else None

    def set_decoder(self, decoder: StreamDecoder | None) -> None:
        """Switch decoders; frames decoded so far are dropped and redone from the stored latents."""
        self.decoder = decoder
        if decoder is not None:
            decoder.reset()
        self.frames.clear()
        self.frame_chunks.clear()

    # ------------------------------------------------------------------ outputs
    def latent(self, first_chunk: int = 0) -> torch.Tensor:
        """Model-space latents of chunks ``first_chunk``.. as [B, T, 16, h, w]."""
        return torch.cat(self.latents[first_chunk:], dim=1)

    def images(self, first_chunk: int = 0) -> torch.Tensor:
        """Frames of chunks ``first_chunk``.. as a ComfyUI IMAGE [B * F, H, W, 3] float32 in [0, 1]:
        decoded frames, or one rough latent-RGB preview per latent frame without a decoder."""
        if self.decoder is None:
            rgb = latent_rgb(self.latent(first_chunk))
            return rgb.permute(0, 1, 3, 4, 2).flatten(0, 1).contiguous()
        frames = torch.cat(self.frames[first_chunk:], dim=1)
        if frames.dtype == torch.uint8:
            frames = frames.float() / 255.0
        return frames.flatten(0, 1).contiguous()

    def nbytes(self) -> int:
        stored = sum(t.numel() * t.element_size() for t in (*self.latents, *self.frames))
        decoder = self.decoder.nbytes() if hasattr(self.decoder, "nbytes") else 0
        return stored + self.stream.state_nbytes() + decoder


def _store(frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return frames if frames.dtype == torch.uint8 else round_to_uint8(frames)
    return frames.to(dtype)
