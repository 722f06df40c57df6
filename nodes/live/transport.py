"""Getting decoded chunks to the page: JPEG-encode the frames and send one compact custom event per
chunk over ComfyUI's WebSocket.

Why a custom event and not ComfyUI's binary preview images (measured in docs/live.md): a binary
preview makes the server's event loop (the thread that also answers every HTTP request and
WebSocket) JPEG-encode each frame at quality 95, and the frontend also paints each one as the
node's core preview image. Here the encoding runs on a sender thread of our own (Pillow releases
the GIL while encoding), the whole chunk travels as one message with its frame numbers and prompt
version, and the server loop only forwards it.

The sender thread also decouples the generation loop from the network: it holds at most
``max_queued`` chunks; when the page cannot keep up, the oldest waiting chunk is dropped (the
recording is unaffected; the page sees a gap in ``first_frame``).
"""

from __future__ import annotations

import base64
import io
import logging
import queue
import threading
from collections.abc import Callable

import torch

from .loop import LiveChunk

log = logging.getLogger("reward_forcing")

CHUNK_EVENT = "rewardforcing.live.chunk"
STATE_EVENT = "rewardforcing.live.state"
ERROR_EVENT = "rewardforcing.live.error"

Send = Callable[[str, dict], None]  # (event, JSON payload); PromptServer.instance.send_sync in ComfyUI


def encode_jpegs(frames: torch.Tensor, quality: int = 85, max_side: int = 0) -> list[bytes]:
    """uint8 frames [F, H, W, 3] -> one JPEG per frame, shrunk to ``max_side`` pixels on the long
    side when that is smaller (0 keeps the size)."""
    from PIL import Image

    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    out = []
    for frame in frames.numpy():
        image = Image.fromarray(frame)
        if max_side and max(image.size) > max_side:
            scale = max_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def chunk_payload(chunk: LiveChunk, jpegs: list[bytes], fps: float, node_id: str | None) -> dict:
    """The JSON body of a chunk event; frames are base64 JPEGs."""
    height, width = chunk.frames.shape[1:3]
    return {
        "session": chunk.session_id,
        "node": node_id,
        "index": chunk.index,
        "first_frame": chunk.first_frame,
        "prompt_version": chunk.prompt_version,
        "seconds": chunk.seconds,
        "switch_latency": chunk.switch_latency,
        "fps": fps,
        "width": int(width),
        "height": int(height),
        "mime": "image/jpeg",
        "frames": [base64.b64encode(j).decode("ascii") for j in jpegs],
    }


class ChunkSender:
    """Encodes and sends chunks on its own thread, in order, dropping the oldest when behind."""

    def __init__(
        self,
        send: Send,
        fps: float,
        node_id: str | None = None,
        quality: int = 85,
        max_side: int = 0,
        max_queued: int = 2,
    ) -> None:
        self.send = send
        self.fps = fps
        self.node_id = node_id
        self.quality = quality
        self.max_side = max_side
        self.dropped = 0
        self.sent = 0
        self._queue: queue.Queue[LiveChunk | None] = queue.Queue()
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="rf-live-sender", daemon=True)
        self._thread.start()

    def submit(self, chunk: LiveChunk) -> None:
        with self._lock:
            while self._queue.qsize() >= self._max_queued:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    break
            self._queue.put(chunk)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            try:
                jpegs = encode_jpegs(chunk.frames, self.quality, self.max_side)
                self.send(CHUNK_EVENT, chunk_payload(chunk, jpegs, self.fps, self.node_id))
                self.sent += 1
            except Exception:  # a failed preview must not end the sender; the recording goes on
                log.exception("Reward Forcing live: sending chunk %d to the page failed", chunk.index)
