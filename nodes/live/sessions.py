"""Live sessions the page can control, keyed by a random id the node announces when it starts.

A session is registered while its node runs. When it ends its last status stays readable for a
while (the page may ask for the recording link after the end), bounded to ``keep_finished``.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

from .loop import LiveLoop

SESSION_ID_HEX = 32  # characters of a session id: 128 random bits, so ids cannot be guessed


def new_session_id() -> str:
    return secrets.token_hex(SESSION_ID_HEX // 2)


class LiveRegistry:
    """Thread-safe: the prompt worker adds and removes, HTTP handlers look up."""

    def __init__(self, keep_finished: int = 16) -> None:
        self.keep_finished = keep_finished
        self._running: dict[str, LiveLoop] = {}
        self._finished: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, loop: LiveLoop) -> None:
        with self._lock:
            if loop.session_id in self._running or loop.session_id in self._finished:
                raise ValueError(f"live session id {loop.session_id} is already in use")
            self._running[loop.session_id] = loop

    def finish(self, loop: LiveLoop) -> None:
        """Forget the loop, keeping its final status."""
        final = loop.status()
        with self._lock:
            self._running.pop(loop.session_id, None)
            self._finished[loop.session_id] = final
            while len(self._finished) > self.keep_finished:
                self._finished.popitem(last=False)

    def get(self, session_id: str) -> LiveLoop | None:
        with self._lock:
            return self._running.get(session_id)

    def final_status(self, session_id: str) -> dict | None:
        with self._lock:
            return self._finished.get(session_id)

    def running(self) -> list[LiveLoop]:
        with self._lock:
            return list(self._running.values())


LIVE_SESSIONS = LiveRegistry()
