"""A video writer on its own thread, so encoding never holds up generation.

H.264 encoding of a 12-frame chunk at 480x832 costs tens of milliseconds of host time (the
conversion, the pipe to ffmpeg, and waiting for ffmpeg to take the frames). Done inline it stalls the
loop that feeds the GPU. ``WriterThread`` takes chunks into a short queue and writes them in order on
a thread of its own; when the queue is full ``write`` waits, so memory stays bounded if the encoder is
slower than the stream.
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

import torch


class ChunkWriter(Protocol):
    def write(self, frames: torch.Tensor) -> None: ...

    def close(self) -> None: ...


_CLOSE = object()


class WriterThread:
    """Wraps a writer (``rf_core.io.video.Mp4Writer`` or anything with ``write``/``close``).

    ``write`` queues a chunk (the caller must not modify it afterwards); an error of the inner writer
    is raised by the next ``write`` or by ``close``. ``close`` writes everything queued, closes the
    inner writer (also after an error, so the file is finished) and joins the thread.
    """

    def __init__(self, inner: ChunkWriter, max_chunks: int = 8) -> None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        self.inner = inner
        self._queue: queue.Queue = queue.Queue(maxsize=max_chunks)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="rf-video-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            if self._error is None:
                try:
                    self.inner.write(item)
                except BaseException as err:  # reported on the caller's thread
                    self._error = err

    def write(self, frames: torch.Tensor) -> None:
        if self._closed:
            raise ValueError("WriterThread is closed")
        if self._error is not None:
            raise self._error
        self._queue.put(frames)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_CLOSE)
        self._thread.join()
        try:
            self.inner.close()
        finally:
            if self._error is not None:
                raise self._error
