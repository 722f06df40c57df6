"""StreamSession.prefill: a session prefilled with clean latents continues exactly as the stream that
generated them, for every sink policy; a remainder shorter than a chunk equals a block-causal full
sequence; the streaming decoders primed with the prefix join it without a seam."""

import pytest
import torch
from _vae_helpers import tiny_vae

from rf_core.config import StreamConfig
from rf_core.model.kv_cache import CacheFullError
from rf_core.schedule import FlowSchedule
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt
from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder
from rf_core.vae.taehv import TAEHV, TAEHVConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HW = (4, 6)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=31)


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(seed=32, tokens=9)


def snapshot(s: StreamSession) -> dict:
    """Everything a later chunk can read: the whole KV buffers (sink included), the cache's
    bookkeeping, the clean frames kept for re-caching, and the noise generators."""
    s.flush()
    c = s.cache
    return {
        "k": c.k.clone(),
        "v": c.v.clone(),
        "frame_ids": list(c.frame_ids),
        "counters": (c.frames, c.next_frame, c.evicted_total, c.pending, s.frames_done),
        "recent": [(i, x.clone()) for i, x in s.recent],
        "rng": [g.get_state() for g in s.generators],
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert torch.equal(a["k"], b["k"]) and torch.equal(a["v"], b["v"])
    assert a["frame_ids"] == b["frame_ids"]
    assert a["counters"] == b["counters"]
    assert [i for i, _ in a["recent"]] == [i for i, _ in b["recent"]]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a["recent"], b["recent"]))
    assert all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"]))


CASES = [  # (config, chunks streamed N, chunks prefilled k)
    (StreamConfig(sink_policy="ema"), 6, 1),  # every eviction and EMA blend after the prefix
    (StreamConfig(sink_policy="ema"), 6, 4),  # the prefix itself evicts and blends
    (StreamConfig(sink_policy="ema", chunk_frames=2, sink_frames=3, window_frames=7), 6, 3),  # chunk != sink
    (StreamConfig(sink_policy="static"), 6, 4),
    (StreamConfig(sink_policy="none"), 6, 4),
    (StreamConfig(sink_policy="global", max_frames=18), 6, 4),
]


@pytest.mark.parametrize("cfg, n_chunks, k", CASES, ids=lambda v: getattr(v, "sink_policy", str(v)))
def test_prefilled_session_continues_the_stream_exactly(model, prompt, cfg, n_chunks, k):
    """Issue 15's exactness test: the same session state after k chunks, then the same chunks k+1..N
    (bit for bit: prefill runs the very context pass the stream ran, on the same latents)."""
    stream = StreamSession(model, prompt, HW, cfg, seed=8, batch=2)
    chunks = []
    for c in range(n_chunks):
        chunks.append(stream.next_chunk())
        if c + 1 == k:
            after_k = snapshot(stream)  # flush() only runs now what the next chunk would run first
    final = snapshot(stream)

    prefilled = StreamSession(model, prompt, HW, cfg, seed=8, batch=2)
    prefilled.prefill(torch.cat(chunks[:k], dim=1))
    assert_same_state(snapshot(prefilled), after_k)
    rest = [prefilled.next_chunk() for _ in range(n_chunks - k)]
    for c, chunk in enumerate(rest, start=k):
        assert torch.equal(chunk, chunks[c]), f"chunk {c} differs"
    assert_same_state(snapshot(prefilled), final)

    # not vacuous: the prefix shapes what follows, and the policy did its work
    fresh = StreamSession(model, prompt, HW, cfg, seed=8, batch=2)
    for g, state in zip(fresh.generators, after_k["rng"]):
        g.set_state(state)
    assert (fresh.next_chunk() - chunks[k]).abs().max() > 1e-3
    if cfg.sink_policy == "ema":
        assert None in final["frame_ids"]  # the sink is a blend of evicted frames
    if k * cfg.chunk_frames > cfg.cache_frames:
        assert after_k["counters"][2] > 0  # the prefix evicted frames


def test_prompt_switch_with_re_cache_around_a_prefill(model, prompt):
    """A re-cache that set_prompt leaves due runs after the next chunk's eviction whether that chunk is
    generated or prefilled; a prefilled prefix followed by a switch continues as the stream did."""
    p2 = random_prompt(seed=33, tokens=5)
    stream = StreamSession(model, prompt, HW, seed=6)
    chunks = [stream.next_chunk() for _ in range(4)]
    stream.set_prompt(p2, recache=True)
    chunks.append(stream.next_chunk())
    chunks.append(stream.next_chunk())
    final = snapshot(stream)

    switched_then_prefilled = StreamSession(model, prompt, HW, seed=6)
    switched_then_prefilled.prefill(torch.cat(chunks[:4], dim=1))
    switched_then_prefilled.set_prompt(p2, recache=True)
    switched_then_prefilled.prefill(chunks[4])
    assert torch.equal(switched_then_prefilled.next_chunk(), chunks[5])
    assert_same_state(snapshot(switched_then_prefilled), final)


def block_causal_mask(blocks: list[int], frame_tokens: int) -> torch.Tensor:
    """Frames of block a attend frames of block b iff b <= a (blocks of any length)."""
    ids = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks) * frame_tokens)
    return ids[None, :] <= ids[:, None]


@pytest.mark.parametrize("prefix", [1, 4, 5])
def test_short_remainder_equals_block_causal_full_sequence(model, prompt, prefix):
    """Independent formulation (as tests/test_stream_equivalence.py): without eviction the stream is one
    full-sequence forward with a block-causal mask. A prefix of T latents is blocks of 3 and then one
    block of T mod 3 (a start image: one block of 1); the generated chunks follow as blocks of 3."""
    h, w = 6, 8
    cfg = StreamConfig(sink_policy="global", max_frames=12)
    g = torch.Generator().manual_seed(40 + prefix)
    known = torch.randn(1, prefix, 16, h, w, generator=g)
    noises = [torch.randn(1, 3, 16, h, w, generator=g) for _ in range(2)]
    renoises = [[torch.randn(1, 3, 16, h, w, generator=g) for _ in range(3)] for _ in range(2)]

    session = StreamSession(model, prompt, (h, w), cfg)
    session.prefill(known)
    assert session.frames_done == prefix and session.cache.frame_ids == list(range(prefix))
    streamed = [session.next_chunk(noises[c], renoises[c]) for c in range(2)]

    blocks = [3] * (prefix // 3) + ([prefix % 3] if prefix % 3 else [])
    sched = FlowSchedule(5.0)
    ts = sched.warp([1000, 750, 500, 250])
    clean = [known]
    for c in range(2):
        x = noises[c]
        mask = block_causal_mask(blocks + [3] * (c + 1), (h // 2) * (w // 2))
        done = sum(t.shape[1] for t in clean)
        for i, t in enumerate(ts):
            seq = torch.cat(clean + [x], dim=1)
            tt = torch.tensor([[0.0] * done + [t] * 3])
            with torch.no_grad():
                v = model(seq.permute(0, 2, 1, 3, 4), tt, prompt, attn_mask=mask).permute(0, 2, 1, 3, 4)
            x0 = (x.double() - float(sched.sigma(t)) * v[:, -3:].double()).float()
            if i + 1 < len(ts):
                s_next = float(sched.sigma(ts[i + 1]))
                x = (1 - s_next) * x0 + s_next * renoises[c][i]
        clean.append(x0)
        assert (streamed[c] - x0).abs().max().item() <= 1e-5, f"chunk {c} after a prefix of {prefix}"


def test_start_image_then_window_and_sink_over_uneven_chunks(model, prompt):
    """A 1-frame prefix, then chunks of 3 through the window of 9 with a sink of 3: frames are evicted
    in the order they came, blended into sink slots 0, 1, 2, 0, ... (hand trace)."""
    s = StreamSession(model, prompt, HW, StreamConfig(sink_policy="ema"), seed=1)
    s.prefill(torch.randn(1, 1, 16, *HW))
    ids = []
    for _ in range(4):
        s.next_chunk()
        s.flush()
        ids.append(list(s.cache.frame_ids))
    assert ids[0] == [0, 1, 2, 3]
    assert ids[1] == [0, 1, 2, 3, 4, 5, 6]
    assert ids[2] == [None, 1, 2, 4, 5, 6, 7, 8, 9]  # frame 3 evicted into sink slot 0
    assert ids[3] == [None, None, None, 7, 8, 9, 10, 11, 12]  # frames 4, 5, 6 into slots 1, 2, 0
    assert s.cache.evicted_total == 4 and s.frames_done == 13


def test_prefill_advances_the_noise_as_generating_does(model, prompt):
    """Generators after prefilling whole chunks = after generating them; a short remainder draws as a
    chunk of its own length would, so a prefilled stream's noise depends only on what was prefilled."""
    cfg = StreamConfig(sink_policy="none")
    gen = StreamSession(model, prompt, HW, cfg, seed=3)
    lat = torch.cat([gen.next_chunk() for _ in range(2)], dim=1)
    pre = StreamSession(model, prompt, HW, cfg, seed=3)
    pre.prefill(lat)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(pre.generators, gen.generators))

    one = StreamSession(model, prompt, HW, cfg, seed=3)
    one.prefill(lat[:, :1])
    expected = torch.Generator().manual_seed(3)
    for _ in range(4):  # one draw per denoising step, shaped like the 1-frame chunk
        torch.randn((1, 16, *HW), generator=expected)
    assert torch.equal(one.generators[0].get_state(), expected.get_state())


def test_cancelled_prefill_resumes_exactly_and_reports_progress(model, prompt):
    lat = torch.randn(1, 7, 16, *HW, generator=torch.Generator().manual_seed(5))
    whole = StreamSession(model, prompt, HW, seed=2)
    progress = []
    whole.prefill(lat, on_chunk=lambda done, total: progress.append((done, total)))
    assert progress == [(3, 7), (6, 7), (7, 7)]

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 2:  # the second chunk's context pass
            raise KeyboardInterrupt

    cut = StreamSession(model, prompt, HW, seed=2, interrupt=interrupt)
    with pytest.raises(KeyboardInterrupt):
        cut.prefill(lat)
    assert cut.frames_done == 3  # the first chunk stays; the second left the session as before it
    cut.prefill(lat[:, 3:])
    assert_same_state(snapshot(cut), snapshot(whole))
    assert torch.equal(cut.next_chunk(), whole.next_chunk())


def test_prefill_after_a_cancelled_generated_chunk_rewinds_its_noise(model, prompt):
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 3:  # inside the first chunk, after two draws of noise
            raise KeyboardInterrupt

    lat = torch.randn(1, 3, 16, *HW, generator=torch.Generator().manual_seed(6))
    cut = StreamSession(model, prompt, HW, seed=4, interrupt=interrupt)
    with pytest.raises(KeyboardInterrupt):
        cut.next_chunk()
    cut.prefill(lat)
    clean = StreamSession(model, prompt, HW, seed=4)
    clean.prefill(lat)
    assert_same_state(snapshot(cut), snapshot(clean))


def test_batch_of_one_serves_every_sample(model, prompt):
    lat = torch.randn(1, 4, 16, *HW, generator=torch.Generator().manual_seed(7))
    a = StreamSession(model, prompt, HW, seed=0, batch=2)
    a.prefill(lat)
    b = StreamSession(model, prompt, HW, seed=0, batch=2)
    b.prefill(lat.expand(2, -1, -1, -1, -1))
    assert_same_state(snapshot(a), snapshot(b))


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 3, 16, 4, 8), r"\[2 or 1, frames >= 1, 16, 4, 6\].*\[1, 3, 16, 4, 8\]"),
        ((3, 3, 16, 4, 6), r"got \[3, 3, 16, 4, 6\]"),
        ((2, 0, 16, 4, 6), "frames >= 1"),
        ((2, 3, 4, 6), "prefill latents must be"),
    ],
)
def test_bad_latents_are_refused_before_anything_changes(model, prompt, shape, match):
    s = StreamSession(model, prompt, HW, seed=0, batch=2)
    s.next_chunk()
    before = snapshot(s)
    with pytest.raises(ValueError, match=match):
        s.prefill(torch.zeros(shape))
    assert_same_state(snapshot(s), before)


def test_non_finite_and_overflowing_prefixes_are_refused(model, prompt):
    s = StreamSession(model, prompt, HW, StreamConfig(sink_policy="global", max_frames=6))
    bad = torch.zeros(1, 2, 16, *HW)
    bad[0, 1, 3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        s.prefill(bad)
    s.next_chunk()
    before = snapshot(s)
    with pytest.raises(CacheFullError, match="4 latent frames after 3 .*max_frames=6"):
        s.prefill(torch.zeros(1, 4, 16, *HW))
    assert_same_state(snapshot(s), before)


def test_prefill_short_of_a_pending_cancelled_chunk_is_refused(model, prompt):
    def interrupt():
        raise KeyboardInterrupt

    s = StreamSession(model, prompt, HW, interrupt=interrupt)
    with pytest.raises(KeyboardInterrupt):
        s.next_chunk()
    s.interrupt = None
    with pytest.raises(ValueError, match="cancelled chunk of 3 frames is pending.*chunk of 1 frames"):
        s.prefill(torch.zeros(1, 1, 16, *HW))


# ---------------------------------------------------------------- decoders primed with the prefix


def _taehv() -> TAEHV:
    model = TAEHV(TAEHVConfig(widths=(12, 8, 6, 4)))
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 25
            p.copy_(torch.randn_like(p) * (0.9 / fan_in**0.5))  # keeps activations O(1)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("prefix", [1, 5])
@pytest.mark.parametrize("kind", ["wan", "taehv"])
def test_decoder_primed_with_the_prefix_continues_without_a_seam(kind, prefix):
    """Decoding the prefix latents (a start image: 1; a 17-frame video: 5) through the stream decoder
    primes its causal state: the new chunks then decode to exactly the frames of a whole-video
    decode, while a decoder that did not see the prefix gives other frames at the join."""
    torch.manual_seed(9)
    z = torch.randn(1, prefix + 6, 16, 4, 6)
    if kind == "wan":
        vae = tiny_vae(seed=3)
        make = lambda: WanStreamDecoder(vae)  # noqa: E731
        whole = (vae.decode(z.transpose(1, 2), latents_per_step=None) * 0.5 + 0.5).transpose(1, 2)
    else:
        taehv = _taehv()
        make = lambda: TAEHVStreamDecoder(taehv)  # noqa: E731
        whole = taehv.decode_video(z)
    primed = make()
    prefix_frames = primed.decode_chunk(z[:, :prefix])
    assert prefix_frames.shape[1] == 1 + 4 * (prefix - 1)
    new = torch.cat([primed.decode_chunk(z[:, i : i + 3]) for i in (prefix, prefix + 3)], dim=1)
    assert new.shape[1] == 24
    assert (torch.cat([prefix_frames, new], dim=1) - whole).abs().max() <= 1e-5
    # a decoder that did not see the prefix starts a new video there: other frames at the join
    cold = make().decode_chunk(z[:, prefix : prefix + 3])[:, 1:]
    assert (cold - new[:, 4:12]).abs().max() > 1e-3
    assert (whole.gt(0) & whole.lt(1)).float().mean() > 0.2  # not a comparison of clamped values
