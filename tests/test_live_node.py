"""The Live node end to end without ComfyUI: a prompt switch and Stop through the routes while it runs."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from _live_helpers import encode, live_module, taehv_decoder, tiny_model

from rf_core.io.video import read_video_frames

live = live_module("live.node")
routes = live_module("live.routes")
handle = live_module("model_handle")


class FakeCLIP:
    """ComfyUI's CLIP as CLIPTextEncode uses it: tokenize, then encode to a CONDITIONING whose
    sequence is longer than the model's text_len (umT5 pads to 512+) with zeros after the prompt."""

    def __init__(self) -> None:
        self.encoded = []

    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens):
        self.encoded.append(tokens["text"])
        emb = F.pad(encode(tokens["text"]), (0, 0, 0, 8))
        return [[emb, {"pooled_output": None}]]


def models():
    model = handle.RFModel(handle.Managed(tiny_model()), "tiny", ("tiny",))
    dec = taehv_decoder().taehv
    decoder = handle.RFDecoder(handle.Managed(dec), "taehv", "taehv", ("taehv",))
    return model, decoder


def drive(actions, timeout=60.0):
    """Run ``actions(session_id, status)`` in the background each time the running session's status changes."""
    done = threading.Event()
    errors = []

    def work():
        deadline = time.monotonic() + timeout
        try:
            while not done.is_set() and time.monotonic() < deadline:
                running = routes.LIVE_SESSIONS.running()
                if running:
                    loop = running[0]
                    if actions(loop.session_id, loop.status()):
                        return
                time.sleep(0.02)
        except Exception as err:  # reported by the test
            errors.append(err)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return done, t, errors


def request(action, **payload):
    status, body = routes.handle(action, payload)
    assert status == 200, body
    return body


def test_live_node_switches_prompt_and_stops_with_a_finished_recording(tmp_path, monkeypatch):
    monkeypatch.setenv("RF_OUTPUT_DIR", str(tmp_path))
    model, decoder = models()
    clip = FakeCLIP()
    seen = {}

    def actions(sid, status):
        if status["chunks"] >= 1 and "switched" not in seen:
            seen["switched"] = request("prompt", session=sid, text="a dog")["prompt_version"]
        if status["prompt_version"] == 1 and status["chunks"] >= 3:
            seen["final"] = request("stop", session=sid)
            return True
        return False

    done, thread, errors = drive(actions)
    out = live.RewardForcingLive().run(
        model, clip, "a cat", seed=7, width=32, height=32, steps=2, max_seconds=3600.0,
        realtime=False, filename_prefix="live/test", image_frames=15, decoder=decoder, unique_id="5",
    )  # fmt: skip
    done.set()
    thread.join()
    assert not errors
    assert seen["switched"] == 1 and clip.encoded[:2] == ["a cat", "a dog"]

    images, video = out["result"]
    entry = out["ui"]["rf_live_recording"][0]
    path = tmp_path / entry["subfolder"] / entry["filename"]
    frames = read_video_frames(path)
    final = routes.LIVE_SESSIONS.final_status(seen["final"]["session"])
    assert final["state"] == "finished" and final["frames"] == frames.shape[0] >= 33
    assert final["recording"] == entry and entry["type"] == "output" and entry["filename"].endswith(".mp4")
    assert images.shape == (15, 32, 32, 3) and images.dtype == torch.float32
    # the images output is the end of the recording (H.264 is lossy: compare loosely)
    tail = torch.from_numpy(frames[-15:]).float() / 255
    assert (images - tail).abs().mean() < 0.15
    assert video is None  # VIDEO needs ComfyUI's comfy_api
    assert not list(tmp_path.rglob("*.partial.mp4"))


def test_live_node_needs_a_decoder_and_a_clip(tmp_path, monkeypatch):
    monkeypatch.setenv("RF_OUTPUT_DIR", str(tmp_path))
    model, _ = models()
    node = live.RewardForcingLive()
    args = dict(seed=0, width=32, height=32, steps=2, max_seconds=1.0)
    with pytest.raises(ValueError, match="connect a decoder"):
        node.run(model, FakeCLIP(), "a cat", **args)
    with pytest.raises(ValueError, match="clip: expected a CLIP"):
        node.run(model, object(), "a cat", decoder=models()[1], **args)
    with pytest.raises(ValueError, match="width 40 is not a positive multiple of 16"):
        node.VALIDATE_INPUTS(width=40, height=32, prompt="a cat")
    with pytest.raises(ValueError, match="prompt is empty"):
        node.VALIDATE_INPUTS(width=32, height=32, prompt="  ")
    assert node.VALIDATE_INPUTS(width=32, height=32, prompt="a cat") is True
    assert node.IS_CHANGED() != node.IS_CHANGED()  # NaN: a live run always runs
