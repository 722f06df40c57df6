"""Control routes of the live player: validation, errors as JSON, and their effect on a live loop."""

import json

import pytest
from _live_helpers import encode, live_module, stream, taehv_decoder

routes = live_module("live.routes")
sessions = live_module("live.sessions")
live_loop = live_module("live.loop")

SID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def registry():
    reg = sessions.LiveRegistry(keep_finished=2)
    loop = live_loop.LiveLoop(
        SID, stream(), taehv_decoder(), encode, lambda c: None, prompt="a cat", node_id="7"
    )
    reg.add(loop)
    return reg


def call(registry, action, payload):
    status, body = routes.handle(action, payload, registry)
    json.dumps(body)  # every answer is JSON
    return status, body


@pytest.mark.parametrize(
    "action, payload, status, message",
    [
        ("prompt", ["not", "an", "object"], 400, "JSON object"),
        ("prompt", {"session": SID}, 400, "text must be a string"),
        ("prompt", {"session": SID, "text": 5}, 400, "text must be a string"),
        ("prompt", {"session": SID, "text": "   "}, 400, "empty"),
        ("prompt", {"session": SID, "text": "x" * 2001}, 400, "2001 characters; the limit is 2000"),
        ("prompt", {"session": SID, "text": "a\x00b"}, 400, "control characters"),
        ("prompt", {"session": SID, "text": "a dog", "recache": "yes"}, 400, "recache must be true or false"),
        (
            "prompt",
            {"session": SID, "text": "a dog", "path": "/etc/passwd"},
            400,
            "unknown field(s) ['path']",
        ),
        ("stop", {"session": "../../etc"}, 400, "32-character id"),
        ("stop", {"session": SID.upper()}, 400, "32-character id"),
        ("stop", {}, 400, "32-character id"),
        ("pause", {"session": "f" * 32}, 404, "no live session"),
        ("status", {"session": "f" * 32}, 404, "no live session"),
        ("delete", {"session": SID}, 404, "unknown live action 'delete'"),
    ],
)
def test_bad_requests_are_refused_with_a_json_message(registry, action, payload, status, message):
    got_status, body = call(registry, action, payload)
    assert got_status == status
    assert message in body["error"]
    loop = registry.get(SID)
    assert loop.status()["pending_prompt_version"] is None and loop.state == live_loop.RUNNING


def test_prompt_request_reaches_the_loop(registry):
    status, body = call(registry, "prompt", {"session": SID, "text": "  a dog on a beach ", "recache": False})
    assert status == 200 and body == {"session": SID, "prompt_version": 1}
    loop = registry.get(SID)
    assert loop._pending[0] == "a dog on a beach" and loop._pending[3] is False
    assert loop.status()["pending_prompt_version"] == 1


def test_pause_resume_stop_and_status(registry):
    loop = registry.get(SID)
    status, body = call(registry, "pause", {"session": SID})
    assert status == 200 and body["state"] == "paused" and body["session"] == SID
    assert loop.state == live_loop.PAUSED
    assert call(registry, "resume", {"session": SID})[1]["state"] == "running"
    status, body = call(registry, "status", {"session": SID})
    assert status == 200 and body["node"] == "7" and body["prompt"] == "a cat" and body["chunks"] == 0
    assert call(registry, "stop", {"session": SID})[1]["state"] == "stopping"
    assert call(registry, "status", {})[1]["sessions"][0]["session"] == SID


def test_finished_session_reports_its_final_status_and_refuses_commands(registry):
    loop = registry.get(SID)
    loop.stop()
    loop.run()
    registry.finish(loop)
    status, body = call(registry, "status", {"session": SID})
    assert status == 200 and body["state"] == "finished"
    status, body = call(registry, "prompt", {"session": SID, "text": "a dog"})
    assert status == 409 and "finished" in body["error"]
    assert call(registry, "status", {})[1] == {"sessions": []}


def test_registry_keeps_a_bounded_number_of_finished_sessions():
    reg = sessions.LiveRegistry(keep_finished=2)
    ids = [sessions.new_session_id() for _ in range(3)]
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    for sid in ids:
        loop = live_loop.LiveLoop(sid, stream(), taehv_decoder(), encode, lambda c: None)
        reg.add(loop)
        with pytest.raises(ValueError, match="already in use"):
            reg.add(loop)
        reg.finish(loop)
    assert reg.final_status(ids[0]) is None and reg.final_status(ids[2])["session"] == ids[2]


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"x" * (routes.MAX_BODY_BYTES + 1), 413, "limit"),
    ],
)
def test_bad_bodies_are_refused(raw, status, message):
    with pytest.raises(routes.RouteError, match=message) as err:
        routes.parse_body(raw)
    assert err.value.status == status


def test_empty_body_is_an_empty_object():
    assert routes.parse_body(b"  ") == {}
    assert routes.parse_body(b'{"session": "x"}') == {"session": "x"}
