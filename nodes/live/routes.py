"""HTTP routes the live player calls: set prompt, pause, resume, stop, status.

All under ``/reward_forcing/live/`` (ComfyUI also serves them under ``/api/...``). Requests name a
live session by the id the node announced; nothing from the client is ever used as a path. Every
error is JSON ``{"error": message}`` with a 4xx status.

``handle`` holds the logic and is plain Python (tested without a server); ``register_routes``
wraps it into aiohttp handlers on ComfyUI's route table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from .loop import FINISHED
from .sessions import LIVE_SESSIONS, SESSION_ID_HEX, LiveRegistry

PREFIX = "/reward_forcing/live"
MAX_PROMPT_CHARS = 2000
MAX_BODY_BYTES = 16 * 1024

_SESSION_RE = re.compile(rf"[0-9a-f]{{{SESSION_ID_HEX}}}")
# Fields each action accepts; anything else is refused rather than silently ignored.
_FIELDS: dict[str, frozenset[str]] = {
    "prompt": frozenset({"session", "text", "recache"}),
    "pause": frozenset({"session"}),
    "resume": frozenset({"session"}),
    "stop": frozenset({"session"}),
    "status": frozenset({"session"}),
}
ACTIONS = tuple(_FIELDS)


class RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def handle(action: str, payload: object, registry: LiveRegistry = LIVE_SESSIONS) -> tuple[int, dict]:
    """Run one control request; returns (HTTP status, JSON body)."""
    try:
        return 200, _dispatch(action, payload, registry)
    except RouteError as err:
        return err.status, {"error": str(err)}


def _dispatch(action: str, payload: object, registry: LiveRegistry) -> dict:
    if action not in _FIELDS:
        raise RouteError(404, f"unknown live action {action!r}; expected one of {list(ACTIONS)}")
    if not isinstance(payload, Mapping):
        raise RouteError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - _FIELDS[action])
    if unknown:
        raise RouteError(400, f"unknown field(s) {unknown} for {action}; allowed: {sorted(_FIELDS[action])}")

    if action == "status" and "session" not in payload:
        return {"sessions": [loop.status() for loop in registry.running()]}
    session_id = _session_id(payload)
    loop = registry.get(session_id)
    if loop is None:
        final = registry.final_status(session_id)
        if final is not None and action == "status":
            return final
        if final is not None:
            raise RouteError(409, f"live session {session_id} has finished")
        raise RouteError(404, f"no live session {session_id} (it may have ended or the server restarted)")

    if action == "prompt":
        text = _prompt_text(payload)
        recache = payload.get("recache")
        if recache is not None and not isinstance(recache, bool):
            raise RouteError(400, f"recache must be true or false, got {recache!r}")
        try:
            version = loop.request_prompt(text, recache)
        except RuntimeError as err:  # finished between the lookup and the request
            raise RouteError(409, str(err)) from None
        return {"session": session_id, "prompt_version": version}
    if action != "status" and loop.state == FINISHED:
        raise RouteError(409, f"live session {session_id} has finished")
    if action == "pause":
        loop.pause()
    elif action == "resume":
        loop.resume()
    elif action == "stop":
        loop.stop()
    return loop.status()


def _session_id(payload: Mapping) -> str:
    value = payload.get("session")
    if not isinstance(value, str) or not _SESSION_RE.fullmatch(value):
        raise RouteError(400, f"session must be the {SESSION_ID_HEX}-character id the live node announced")
    return value


def _prompt_text(payload: Mapping) -> str:
    text = payload.get("text")
    if not isinstance(text, str):
        raise RouteError(400, "text must be a string")
    text = text.strip()
    if not text:
        raise RouteError(400, "text is empty: type a prompt")
    if len(text) > MAX_PROMPT_CHARS:
        raise RouteError(400, f"text has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise RouteError(400, "text contains control characters")
    return text


def parse_body(raw: bytes) -> object:
    """The JSON value of a request body (an empty body is an empty object)."""
    if len(raw) > MAX_BODY_BYTES:
        raise RouteError(413, f"request body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RouteError(400, f"the request body is not valid JSON: {err}") from None


def register_routes(routes, registry: LiveRegistry = LIVE_SESSIONS) -> None:
    """Add the handlers to an aiohttp RouteTableDef (``PromptServer.instance.routes``)."""
    from aiohttp import web

    def reply(status: int, body: dict):
        return web.json_response(body, status=status)

    for action in ACTIONS:
        if action == "status":
            continue

        async def post(request, action=action):
            try:
                payload = parse_body(await request.content.read(MAX_BODY_BYTES + 1))
            except RouteError as err:
                return reply(err.status, {"error": str(err)})
            return reply(*handle(action, payload, registry))

        routes.post(f"{PREFIX}/{action}")(post)

    async def status(request):
        query = dict(request.rel_url.query)
        return reply(*handle("status", query, registry))

    routes.get(f"{PREFIX}/status")(status)
