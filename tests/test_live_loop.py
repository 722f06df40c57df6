"""The live loop with a tiny real stream, a small real TAEHV and the real MP4 writer."""

import threading
import time

import numpy as np
import pytest
import torch
from _live_helpers import SpyDecoder, encode, live_module, stream, taehv_decoder

from rf_core.io.video import Mp4Writer, read_video_frames

live_loop = live_module("live.loop")
LiveLoop = live_loop.LiveLoop


class Recorder:
    def __init__(self) -> None:
        self.chunks = []
        self.events = []
        self.hooks = {}  # chunk index -> callable run when that chunk arrives

    def on_chunk(self, chunk):
        self.chunks.append(chunk)
        hook = self.hooks.get(chunk.index)
        if hook is not None:
            hook()

    def on_event(self, name, payload):
        self.events.append((name, payload))


def make_loop(rec, decoder=None, **kw):
    kw.setdefault("max_chunks", 4)
    return LiveLoop(
        "f" * 32,
        stream(),
        decoder or SpyDecoder(taehv_decoder()),
        encode,
        rec.on_chunk,
        on_event=rec.on_event,
        prompt="a cat",
        **kw,
    )


def reference_latents(n_chunks, switch_before=None, text="a dog", recache=True):
    """The same stream driven directly through StreamSession, switching before chunk ``switch_before``."""
    s = stream()
    out = []
    for i in range(n_chunks):
        if i == switch_before:
            s.set_prompt(encode(text), recache=recache)
        out.append(s.next_chunk())
    return out


def request_during_chunk_1(loop):
    passes = {"n": 0}

    def on_pass(i, n):  # the request arrives during chunk 1 (after its first model pass)
        passes["n"] += 1
        if passes["n"] == n + 1:
            loop.request_prompt("a dog", recache=True)

    loop.session.on_pass = on_pass
    return passes


def test_switch_requested_mid_chunk_abandons_that_chunk_and_redoes_it_under_the_new_prompt():
    rec = Recorder()
    spy = SpyDecoder(taehv_decoder())
    loop = make_loop(rec, spy, max_chunks=3)
    passes = request_during_chunk_1(loop)
    result = loop.run()

    assert result.chunks == 3
    # chunk 1 was abandoned after one pass: 2 passes of chunk 0, 1 abandoned, then 2 + 2
    assert passes["n"] == 2 + 1 + 2 + 2
    switched = reference_latents(3, switch_before=1, text="a dog", recache=True)
    assert not torch.allclose(reference_latents(3)[1], switched[1])  # the switch is visible in chunk 1
    for got, want in zip(spy.latents, switched):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [c.prompt_version for c in rec.chunks] == [0, 1, 1]
    assert [c.switch_latency is not None for c in rec.chunks] == [False, True, False]
    assert loop.status()["prompt"] == "a dog"


def test_without_abandoning_a_switch_applies_from_the_next_chunk():
    rec = Recorder()
    spy = SpyDecoder(taehv_decoder())
    loop = make_loop(rec, spy, max_chunks=3, abandon_on_switch=False)
    request_during_chunk_1(loop)
    loop.run()
    switched = reference_latents(3, switch_before=2, text="a dog", recache=True)
    for got, want in zip(spy.latents, switched):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [c.prompt_version for c in rec.chunks] == [0, 0, 1]


def test_overlapped_handover_gives_the_same_chunks_in_order_and_keeps_finished_ones_on_stop():
    """With ``overlap`` chunk c is handed over once chunk c + 1 is made (at once for the first chunk
    and for the first under a new prompt); the chunks themselves do not change."""
    rec, plain_rec = Recorder(), Recorder()
    spy = SpyDecoder(taehv_decoder())
    make_loop(plain_rec, max_chunks=5).run()
    loop = make_loop(rec, spy, max_chunks=5, overlap=True)
    handed = []
    loop.on_chunk = lambda c: (handed.append((c.index, len(spy.latents))), rec.on_chunk(c))
    loop.run()
    assert [c.index for c in rec.chunks] == list(range(5))
    for a, b in zip(rec.chunks, plain_rec.chunks):
        assert torch.equal(a.frames, b.frames) and a.first_frame == b.first_frame
    # chunk 0 at once; chunk c (1..3) once chunk c + 1 was decoded too; the last at the end
    assert handed == [(0, 1), (1, 3), (2, 4), (3, 5), (4, 5)]

    stop_rec = Recorder()
    stopping = make_loop(stop_rec, max_chunks=50, overlap=True)
    stop_rec.hooks[1] = stopping.stop  # chunk 2 is made (in flight) when chunk 1 is handed over
    result = stopping.run()
    assert result.stopped_by == "stop" and [c.index for c in stop_rec.chunks] == [0, 1, 2]


def test_recache_option_is_passed_to_the_engine():
    rec = Recorder()
    spy = SpyDecoder(taehv_decoder())
    loop = make_loop(rec, spy, max_chunks=3)
    rec.hooks[1] = lambda: loop.request_prompt("a dog", recache=False)
    loop.run()
    # chunk 0 is the sink; re-caching rewrites the window after it, so switch after chunk 1
    with_recache = reference_latents(3, switch_before=2, recache=True)
    without = reference_latents(3, switch_before=2, recache=False)
    assert not torch.allclose(with_recache[2], without[2])
    for got, want in zip(spy.latents, without):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_latest_of_several_requests_wins():
    rec = Recorder()
    spy = SpyDecoder(taehv_decoder())
    loop = make_loop(rec, spy, max_chunks=2)

    def two_requests():
        assert loop.request_prompt("a bird") == 1
        assert loop.request_prompt("a dog") == 2

    rec.hooks[0] = two_requests
    loop.run()
    want = reference_latents(2, switch_before=1, text="a dog")
    torch.testing.assert_close(spy.latents[1], want[1], rtol=0, atol=0)
    assert rec.chunks[1].prompt_version == 2


def test_frames_sent_are_the_decoded_frames_rounded_and_counted_in_run_order():
    rec = Recorder()
    spy = SpyDecoder(taehv_decoder())
    loop = make_loop(rec, spy, max_chunks=3, keep_frames=20)
    result = loop.run()
    first = 0
    for chunk, out in zip(rec.chunks, spy.outputs):
        want = torch.floor(out[0].permute(0, 2, 3, 1).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        assert torch.equal(chunk.frames, want)
        assert chunk.first_frame == first
        first += want.shape[0]
    # TAEHV drops 3 start-up frames: 9 frames from the first chunk, 12 from each later one
    assert [c.frames.shape[0] for c in rec.chunks] == [9, 12, 12]
    assert result.frames == 33 and result.stopped_by == "length"
    all_frames = torch.cat([c.frames for c in rec.chunks])
    torch.testing.assert_close(result.images, all_frames[-20:].float() / 255, rtol=0, atol=0)


def test_stop_ends_the_run_and_finalises_the_mp4(tmp_path):
    rec = Recorder()
    path = tmp_path / "live.mp4"
    loop = make_loop(rec, writer=Mp4Writer(path, fps=16), max_chunks=50)
    rec.hooks[1] = loop.stop
    result = loop.run()

    assert result.stopped_by == "stop" and result.chunks == 2
    assert loop.state == live_loop.FINISHED
    assert path.is_file() and not (tmp_path / "live.partial.mp4").exists()
    video = read_video_frames(path)
    sent = torch.cat([c.frames for c in rec.chunks]).numpy()
    assert video.shape == sent.shape == (21, 32, 32, 3)
    assert np.abs(video.astype(int) - sent.astype(int)).mean() < 40  # lossy H.264 of noise, same frames
    name, final = rec.events[-1]
    assert name == "state" and final["state"] == "finished" and final["stopped_by"] == "stop"


def test_stop_during_a_chunk_drops_that_chunk_within_one_pass(tmp_path):
    rec = Recorder()
    loop = make_loop(rec, writer=Mp4Writer(tmp_path / "a.mp4"), max_chunks=50)
    passes = []

    def on_pass(i, n):
        passes.append(i)
        if len(passes) == n + 1:  # first pass of chunk 1
            loop.stop()

    loop.session.on_pass = on_pass
    result = loop.run()
    assert result.chunks == 1 and result.stopped_by == "stop"
    assert len(passes) == 3  # 2 denoising passes of chunk 0, 1 of chunk 1: no further pass ran
    assert read_video_frames(tmp_path / "a.mp4").shape[0] == 9


def test_cancel_during_a_prompt_switch_is_not_taken_for_a_refused_prompt():
    """ComfyUI's Cancel check clears its flag as it raises: raised while a switch flushes the last
    chunk's refresh, it must end the run, not be reported as a failed switch and lost."""

    class Cancelled(Exception):
        pass

    rec = Recorder()
    armed = {"on": False}

    def interrupt():
        if armed["on"]:
            armed["on"] = False  # one-shot, like ComfyUI's flag
            raise Cancelled

    loop = make_loop(rec, max_chunks=6, interrupt=interrupt)

    def switch_then_cancel():
        loop.request_prompt("a dog")
        armed["on"] = True  # the next pass is chunk 0's deferred refresh, run by the switch

    rec.hooks[0] = switch_then_cancel
    with pytest.raises(Cancelled):
        loop.run()
    assert not [p for name, p in rec.events if name == "error"]
    assert rec.events[-1][1]["stopped_by"] == "cancel"


def test_cancel_propagates_and_still_finishes_the_recording(tmp_path):
    class Cancelled(Exception):
        pass

    rec = Recorder()
    cancel = threading.Event()

    def interrupt():
        if cancel.is_set():
            raise Cancelled

    loop = make_loop(rec, writer=Mp4Writer(tmp_path / "c.mp4"), interrupt=interrupt, max_chunks=50)
    rec.hooks[1] = cancel.set
    with pytest.raises(Cancelled):
        loop.run()
    assert loop.state == live_loop.FINISHED
    assert read_video_frames(tmp_path / "c.mp4").shape[0] == 21
    assert rec.events[-1][1]["stopped_by"] == "cancel"


def test_pause_holds_until_resume_and_cancel_works_while_paused():
    rec = Recorder()
    loop = make_loop(rec, max_chunks=2)
    rec.hooks[0] = loop.pause
    seen = {}

    def resume_later():
        deadline = time.monotonic() + 10
        while loop.state != live_loop.PAUSED and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["status"] = loop.status()["state"]
        time.sleep(0.3)
        seen["resumed_at"] = time.monotonic()
        loop.resume()

    t = threading.Thread(target=resume_later)
    t.start()
    ready = []
    loop.on_chunk = lambda c: (ready.append(time.monotonic()), rec.on_chunk(c))
    loop.run()
    t.join()
    assert seen["status"] == "paused"
    assert len(ready) == 2 and ready[1] > seen["resumed_at"]

    class Cancelled(Exception):
        pass

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if loop2.state == live_loop.PAUSED:
            raise Cancelled

    rec2 = Recorder()
    loop2 = make_loop(rec2, max_chunks=5, interrupt=interrupt)
    rec2.hooks[0] = loop2.pause
    with pytest.raises(Cancelled):
        loop2.run()
    assert len(rec2.chunks) == 1


def test_realtime_paces_generation_to_playback():
    rec = Recorder()
    fps = 60.0  # chunks of 12 frames last 0.2 s
    loop = make_loop(rec, max_chunks=4, realtime=True, fps=fps, ahead_seconds=0.05)
    done = []
    loop.on_chunk = lambda c: (done.append(time.monotonic()), rec.on_chunk(c))
    loop.run()
    # chunk k + 1 may start only once playback is within 0.05 s of the end of what exists
    frames = np.cumsum([c.frames.shape[0] for c in rec.chunks])
    for k in range(1, 4):
        earliest_start = done[0] + frames[k - 1] / fps - 0.05
        assert done[k] >= earliest_start - 0.01


def test_refused_prompt_keeps_the_stream_going_and_reports_the_error():
    rec = Recorder()

    def picky(text):
        if text == "bad":
            raise ValueError("cannot encode that")
        return encode(text)

    loop = make_loop(rec, max_chunks=2)
    loop.encode_prompt = picky
    rec.hooks[0] = lambda: loop.request_prompt("bad")
    result = loop.run()
    assert result.chunks == 2 and rec.chunks[1].prompt_version == 0
    errors = [p for name, p in rec.events if name == "error"]
    assert errors and "cannot encode that" in errors[0]["message"]
    assert loop.status()["prompt"] == "a cat"


def test_requests_after_the_end_are_refused():
    rec = Recorder()
    loop = make_loop(rec, max_chunks=1)
    loop.run()
    with pytest.raises(RuntimeError, match="finished"):
        loop.request_prompt("a dog")
