"""The live loop: one long generation that runs until stopped, takes prompt changes between chunks,
and hands every decoded chunk to the page and to the recording as soon as it exists.

Plain Python and torch, no ComfyUI: the live node (``nodes/live/node.py``) injects the text encoder, the
frame sender and the video writer, tests inject their own. Control calls (``request_prompt``,
``pause``, ``resume``, ``stop``, ``status``) come from HTTP route handlers on the server's thread
while ``run`` executes on the prompt worker thread, so every piece of shared state sits behind one
lock; the loop only reads it between chunks and before each model pass.

Timing of a prompt switch: a request that arrives while chunk k is being generated abandons chunk
k at its next model pass (``abandon_on_switch``, the default), then the prompt is applied (encode,
then ``StreamSession.set_prompt`` with the re-cache option) and chunk k is generated again under it.
``StreamSession`` guarantees that the session afterwards is exactly what a switch before chunk k
would have given. The switch latency reported with the first chunk under the new prompt runs from
the request to the moment its frames are on the host.

Throughput (``overlap``, on by default on CUDA): chunk c is decoded on a side CUDA stream while the
DiT makes chunk c + 1 (``rf_core.pipeline.AsyncDecoder``), and its frames reach the page, the
recording and the kept images while the GPU works on. The first chunk and the first chunk under a
new prompt are handed over at once, so the time to first frame and the switch latency don't wait
for the next chunk. The recording is written on its own thread (``rf_core.io.writer_thread``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from rf_core.pipeline import AsyncDecoder
from rf_core.stream import StreamSession

log = logging.getLogger("reward_forcing")

# States reported by ``status()`` and sent to the page.
RUNNING, PAUSED, STOPPING, FINISHED = "running", "paused", "stopping", "finished"

_PAUSE_POLL_S = 0.1  # how often a paused loop checks Cancel/Stop


class _StopRequested(Exception):
    """Raised from the engine's per-pass hook to abandon the chunk in progress when Stop is pressed."""


class _SwitchRequested(Exception):
    """Raised from the engine's per-pass hook to abandon the chunk in progress for a new prompt."""


@dataclass(frozen=True)
class LiveChunk:
    """One decoded chunk on its way to the page.

    frames: uint8 [F, H, W, 3] on the CPU (the first sample of the batch).
    first_frame: index of ``frames[0]`` in the run.
    prompt_version: 0 for the node's prompt, then 1, 2, ... for each switch requested.
    seconds: wall time since the previous chunk was handed over (the first: since the run started).
    switch_latency: for the first chunk under a new prompt, seconds from the request to its frames.
    """

    session_id: str
    index: int
    first_frame: int
    frames: torch.Tensor
    prompt_version: int
    seconds: float
    switch_latency: float | None


@dataclass(frozen=True)
class LiveResult:
    chunks: int
    frames: int
    stopped_by: str  # "stop", "length" or "cancel"
    images: torch.Tensor | None  # the kept tail of the run, float32 [N, H, W, 3] in [0, 1]


class Decoder(Protocol):
    """What the loop needs from a decoder (rf_core's TAEHV / Wan VAE stream decoders)."""

    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """[B, n, 16, h, w] model-space latents -> [B, F, 3, H, W] frames in [0, 1]."""

    def reset(self) -> None: ...


class Writer(Protocol):
    """What the loop needs from a video writer (rf_core.io.video.Mp4Writer)."""

    def write(self, frames: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class LiveLoop:
    """Runs ``session`` chunk after chunk until Stop, Cancel or ``max_chunks``.

    Args:
        session_id: the id the page uses in its requests.
        session: the engine stream, already set up with the node's prompt.
        decoder: turns each latent chunk into frames in [0, 1].
        encode_prompt: text -> prompt embeddings for ``StreamSession.set_prompt``; runs on this
            loop's thread (ComfyUI's text encoder must not run on the server thread).
        on_chunk: receives each decoded chunk (the page sender).
        on_event: receives state changes as (event name, JSON-able dict): "state" and "error".
        writer: records every frame (optional).
        prompt: the text of the node's prompt (reported by ``status``).
        max_chunks: length cap.
        recache: default for prompt switches that do not say (re-run the window under the new prompt).
        keep_frames: how many of the last frames ``run`` returns as images (0: none).
        interrupt: ComfyUI's Cancel check; raises to cancel (also polled while paused).
        clock: seconds, monotonic (tests pass a fake one).
        fps: the stream's frame rate (the page plays at it).
        node_id: the ComfyUI node running the loop (the page finds its session by it).
        realtime: pace generation to playback: start a chunk only when the stream is less than
            ``ahead_seconds`` ahead of real time, so the page's buffer and the delay of a prompt
            switch stay short when the GPU is faster than the stream's fps. A stream that falls
            behind never bursts to catch up. Off: as fast as possible (benchmarks).
        overlap: decode chunk c while the DiT makes chunk c + 1 (default: on CUDA).
        abandon_on_switch: a prompt request abandons the chunk in flight at its next model pass
            instead of waiting for it to finish.
    """

    def __init__(
        self,
        session_id: str,
        session: StreamSession,
        decoder: Decoder,
        encode_prompt: Callable[[str], torch.Tensor],
        on_chunk: Callable[[LiveChunk], None],
        *,
        on_event: Callable[[str, dict], None] | None = None,
        writer: Writer | None = None,
        prompt: str = "",
        max_chunks: int = 1000,
        recache: bool = True,
        keep_frames: int = 0,
        interrupt: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        fps: float = 16.0,
        node_id: str | None = None,
        realtime: bool = False,
        ahead_seconds: float = 1.0,
        overlap: bool | None = None,
        abandon_on_switch: bool = True,
    ) -> None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        if keep_frames < 0:
            raise ValueError(f"keep_frames must be >= 0, got {keep_frames}")
        self.session_id = session_id
        self.session = session
        self.decoder = decoder
        self.encode_prompt = encode_prompt
        self.on_chunk = on_chunk
        self.on_event = on_event
        self.writer = writer
        self.max_chunks = max_chunks
        self.recache = recache
        self.keep_frames = keep_frames
        self.interrupt = interrupt
        self.clock = clock
        self.fps = fps
        self.node_id = node_id
        self.realtime = realtime
        self.ahead_seconds = ahead_seconds
        self.overlap = session.device.type == "cuda" if overlap is None else overlap
        self.abandon_on_switch = abandon_on_switch
        self._pace_origin: float | None = None  # wall time at which frame 0 counts as shown
        session.interrupt = self._check  # Stop, Cancel and prompt switches act before every model pass
        self._generating = False  # a chunk of the engine is in progress (switches may abandon it)
        # On CUDA the host would queue a whole chunk's passes in a few milliseconds and then wait, so a
        # switch or Stop checked "before every pass" would only act a chunk later: keep at most one
        # pass queued ahead of the GPU (the GPU never idles: it runs pass p - 1 while p is prepared).
        self._pass_marks: deque | None = deque() if session.device.type == "cuda" else None
        self._pipe: AsyncDecoder | None = None
        self._in_flight: deque[tuple[float | None, int]] = deque()  # (switch requested at, version)
        self._submitted = 0
        self._last_handover: float | None = None

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._state = RUNNING
        self._stop = False
        self._prompt = prompt
        self._prompt_version = 0
        self._pending: tuple[str, int, float, bool] | None = None  # text, version, requested at, recache
        self._requested_version = 0
        self._chunks = 0
        self._frames = 0
        self._last_seconds: float | None = None
        self._last_switch_latency: float | None = None
        self._error: str | None = None
        self._started = clock()
        self._kept: deque[torch.Tensor] = deque()
        self._kept_frames = 0
        self.recording: dict | None = None  # {"filename", "subfolder", "type"} set by the node

    # ------------------------------------------------------------------ control (any thread)
    def request_prompt(self, text: str, recache: bool | None = None) -> int:
        """Ask for ``text`` from the next chunk on; returns the prompt version it will carry.
        A newer request before that chunk replaces this one."""
        with self._lock:
            if self._state == FINISHED:
                raise RuntimeError(f"live session {self.session_id} has finished")
            self._requested_version += 1
            version = self._requested_version
            self._pending = (text, version, self.clock(), self.recache if recache is None else bool(recache))
            self._wake.notify_all()
        return version

    def pause(self) -> None:
        """Hold after the chunk in progress (the page keeps showing what it has)."""
        with self._lock:
            if self._state == RUNNING:
                self._state = PAUSED
        self._emit_state()

    def resume(self) -> None:
        with self._lock:
            if self._state == PAUSED:
                self._state = RUNNING
                self._wake.notify_all()
        self._emit_state()

    def stop(self) -> None:
        """End the run: the chunk in progress is dropped at its next model pass, the recording is
        finished and the node returns."""
        with self._lock:
            if self._state != FINISHED:
                self._stop = True
                self._state = STOPPING
                self._wake.notify_all()
        self._emit_state()

    def status(self) -> dict:
        with self._lock:
            return {
                "session": self.session_id,
                "node": self.node_id,
                "state": self._state,
                "chunks": self._chunks,
                "frames": self._frames,
                "max_chunks": self.max_chunks,
                "fps": self.fps,
                "prompt": self._prompt,
                "prompt_version": self._prompt_version,
                "pending_prompt_version": self._pending[1] if self._pending else None,
                "chunk_seconds": self._last_seconds,
                "switch_latency": self._last_switch_latency,
                "elapsed": self.clock() - self._started,
                "error": self._error,
                "recording": self.recording,
            }

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    # ------------------------------------------------------------------ the loop (worker thread)
    def run(self) -> LiveResult:
        """Generate until Stop, Cancel (the ``interrupt`` exception propagates) or the length cap.
        Chunks the engine finished are always handed over; the writer is closed in every case, so
        the recording is a finished file."""
        stopped_by = "length"
        self._emit_state()
        self._pipe = AsyncDecoder(self.decoder, self.session.device, torch.uint8)
        self._last_handover = self.clock()
        try:
            while self._submitted < self.max_chunks:
                if not self._wait_until_due():
                    stopped_by = "stop"
                    break
                try:
                    switch_at = self._apply_pending_prompt()
                    self._generate(switch_at)
                except _SwitchRequested:
                    continue  # the newer prompt is applied and the chunk generated again under it
                except _StopRequested:
                    stopped_by = "stop"
                    break
            self._hand_over(keep=0)
            if self._stop_requested():
                stopped_by = "stop"
        except BaseException:
            stopped_by = "cancel"
            raise
        finally:
            try:
                if self._pipe.pending and stopped_by == "cancel":
                    self._hand_over(keep=0)  # finished chunks still reach the recording
            finally:
                self._finish(stopped_by)
        return LiveResult(self._chunks, self._frames, stopped_by, self._kept_images())

    def _check(self) -> None:
        if self._pass_marks is not None:
            mark = torch.cuda.Event()
            mark.record()  # the end of everything queued so far: the previous pass
            self._pass_marks.append(mark)
            if len(self._pass_marks) > 2:
                self._pass_marks.popleft()
            if len(self._pass_marks) == 2:
                self._pass_marks[0].synchronize()  # the pass before the previous one is done
        with self._lock:
            stop, switch = self._stop, self._pending is not None
        if stop:
            raise _StopRequested
        if switch and self._generating and self.abandon_on_switch:
            raise _SwitchRequested
        if self.interrupt is not None:
            self.interrupt()

    def _stop_requested(self) -> bool:
        with self._lock:
            return self._stop

    def _wait_until_due(self) -> bool:
        """Block while paused and, with ``realtime``, until the next chunk is due. False when Stop
        ends the run; Cancel raises."""
        while True:
            with self._lock:
                if self._stop:
                    return False
                timeout = _PAUSE_POLL_S if self._state == PAUSED else self._pacing_wait()
                if timeout <= 0:
                    return True
                self._wake.wait(min(timeout, _PAUSE_POLL_S))
            if self.interrupt is not None:
                self.interrupt()

    def _pacing_wait(self) -> float:
        """Seconds until the next chunk is due (<= 0: now). Caller holds the lock."""
        if not self.realtime or self._pace_origin is None:
            return 0.0
        now = self.clock()
        # The page cannot show more than was generated: after a stall (slow GPU, pause) playback
        # counts from now, so the stream never bursts to catch up. Chunks still decoding count as made.
        made = self._frames + len(self._in_flight) * 4 * self.session.config.chunk_frames
        self._pace_origin = max(self._pace_origin, now - made / self.fps)
        return made / self.fps - (now - self._pace_origin) - self.ahead_seconds

    def _apply_pending_prompt(self) -> float | None:
        """Switch to the newest requested prompt, if any; returns when it was requested."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        text, version, requested_at, recache = pending
        # The last chunk's deferred refresh belongs to the old prompt; it runs here, outside the
        # handler below, so that Stop and Cancel raised before its pass are never taken for a
        # refused prompt.
        self.session.flush()
        try:
            embeds = self.encode_prompt(text)
            self.session.set_prompt(embeds, recache=recache)
        except Exception as err:  # a prompt the encoder refuses keeps the stream on the old prompt
            log.warning("Reward Forcing live: prompt switch failed: %s", err)
            with self._lock:
                self._error = f"prompt switch failed: {err}"
            self._emit(
                "error", {"session": self.session_id, "message": self._error, "prompt_version": version}
            )
            return None
        with self._lock:
            self._prompt = text
            self._prompt_version = version
            self._error = None
        return requested_at

    def _generate(self, switch_at: float | None) -> None:
        """One chunk through the engine and into the decoder; hands over what is due."""
        self._generating = True
        try:
            z = self.session.next_chunk()
        finally:
            self._generating = False
        with self._lock:
            version = self._prompt_version
        self._pipe.submit(z)
        self._in_flight.append((switch_at, version))
        self._submitted += 1
        # The first chunk and the first under a new prompt at once; others once the next is under way.
        now = switch_at is not None or self._submitted == 1 or not self.overlap
        self._hand_over(keep=0 if now else 1)

    def _hand_over(self, keep: int) -> None:
        """Hand over decoded chunks, oldest first, until ``keep`` remain in flight."""
        while len(self._in_flight) > keep:
            switch_at, version = self._in_flight.popleft()
            frames = self._pipe.pop().frames[0]  # uint8 [F, H, W, 3], the first sample of the batch
            now = self.clock()
            latency = None if switch_at is None else now - switch_at
            with self._lock:
                index, first = self._chunks, self._frames
                self._chunks += 1
                self._frames += frames.shape[0]
                seconds = now - self._last_handover
                self._last_seconds = seconds
                if latency is not None:
                    self._last_switch_latency = latency
                if self._pace_origin is None:
                    self._pace_origin = now
            self._last_handover = now
            if self.writer is not None:
                self.writer.write(frames)
            self._keep(frames)
            self.on_chunk(LiveChunk(self.session_id, index, first, frames, version, seconds, latency))

    def _keep(self, frames: torch.Tensor) -> None:
        if self.keep_frames == 0:
            return
        self._kept.append(frames)
        self._kept_frames += frames.shape[0]
        while self._kept_frames - self._kept[0].shape[0] >= self.keep_frames:
            self._kept_frames -= self._kept.popleft().shape[0]

    def _kept_images(self) -> torch.Tensor | None:
        if not self._kept:
            return None
        frames = torch.cat(list(self._kept))[-self.keep_frames :]
        return frames.float() / 255.0

    def _finish(self, stopped_by: str) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            with self._lock:
                self._state = FINISHED
                self._pending = None
            self._emit("state", {**self.status(), "stopped_by": stopped_by})

    # ------------------------------------------------------------------ events
    def _emit_state(self) -> None:
        self._emit("state", self.status())

    def _emit(self, name: str, payload: dict) -> None:
        if self.on_event is not None:
            self.on_event(name, payload)
