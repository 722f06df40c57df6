"""Module-level registry of interactive stream sessions, keyed by a session id.

ComfyUI drops node instances and cached outputs when another workflow runs, so a session's state
(KV cache, sink, RNG, frame counter, decoder cache, latents and frames so far) lives here instead.
The registry holds at most ``max_bytes`` (env ``RF_SESSION_MEMORY_GB``, default 32): after each run
the least recently used other sessions are freed until the total fits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from .record import StreamRecord

log = logging.getLogger("reward_forcing")

_GIB = 1024**3


@dataclass
class Session:
    session_id: str
    record: StreamRecord
    settings: tuple  # what must stay the same for the stream to continue (model, size, config)
    decoder_key: tuple
    prompt: torch.Tensor  # the prompt embeddings the stream uses now (CPU)
    model: object = None  # the RF_MODEL handle, which keeps the loaded weights alive while the session lives
    last_used: float = field(default_factory=time.monotonic)

    def nbytes(self) -> int:
        return self.record.nbytes()


class SessionRegistry:
    """Thread-safe (HTTP routes run on another thread than the prompt worker)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._sessions: dict[str, Session] = {}
        self._lock = threading.RLock()

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None:
                s.last_used = time.monotonic()
            return s

    def put(self, session: Session) -> None:
        with self._lock:
            self._sessions[session.session_id] = session
            session.last_used = time.monotonic()

    def free(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def free_all(self) -> int:
        with self._lock:
            n = len(self._sessions)
            self._sessions.clear()
            return n

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes() for s in self._sessions.values())

    def enforce_cap(self, keep: str | None = None) -> list[str]:
        """Free least recently used sessions other than ``keep`` until the total fits; returns their ids."""
        freed = []
        with self._lock:
            while self.total_bytes() > self.max_bytes:
                others = [s for s in self._sessions.values() if s.session_id != keep]
                if not others:
                    log.warning(
                        "Reward Forcing session %r holds %.2f GiB, more than the %.2f GiB session memory cap "
                        "(RF_SESSION_MEMORY_GB); free it or reset it when done",
                        keep,
                        self.total_bytes() / _GIB,
                        self.max_bytes / _GIB,
                    )
                    break
                oldest = min(others, key=lambda s: s.last_used)
                del self._sessions[oldest.session_id]
                freed.append(oldest.session_id)
                log.info("Reward Forcing: freed session %r (session memory cap)", oldest.session_id)
        return freed


def _default_cap() -> int:
    raw = os.environ.get("RF_SESSION_MEMORY_GB", "32")
    try:
        return int(float(raw) * _GIB)
    except ValueError:
        raise ValueError(f"RF_SESSION_MEMORY_GB must be a number of GiB, got {raw!r}") from None


REGISTRY = SessionRegistry(_default_cap())
