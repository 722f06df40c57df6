"""StreamSession behaviour: determinism, batching, prompt switches, cancellation, bad input."""

import pytest
import torch

from rf_core.config import StreamConfig
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt

HW = (4, 6)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=21)


def run(model, prompt, seed, chunks=4, **kw):
    s = StreamSession(model, prompt, HW, seed=seed, **kw)
    return torch.cat([s.next_chunk() for _ in range(chunks)], dim=1)


def test_same_seed_same_output_different_seed_differs(model):
    p = random_prompt(seed=1)
    a, b, c = run(model, p, 5), run(model, p, 5), run(model, p, 6)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_global_rng_is_not_used(model):
    p = random_prompt(seed=1)
    torch.manual_seed(0)
    a = run(model, p, 5, chunks=2)
    state = torch.get_rng_state()
    torch.manual_seed(999)
    b = run(model, p, 5, chunks=2)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    run(model, p, 5, chunks=2)
    assert torch.equal(torch.get_rng_state(), state)


def test_batch_of_two_equals_two_single_runs(model):
    p1, p2 = random_prompt(seed=1), random_prompt(seed=2, tokens=5)
    both = run(model, torch.cat([p1, p2]), seed=10)
    one = run(model, p1, seed=10)
    two = run(model, p2, seed=11)
    assert both.shape[0] == 2
    assert (both[0] - one[0]).abs().max() <= 1e-5
    assert (both[1] - two[0]).abs().max() <= 1e-5


def test_explicit_noise_is_used(model):
    p = random_prompt(seed=1)
    s = StreamSession(model, p, HW, seed=0)
    noise = torch.randn(1, 3, 16, *HW, generator=torch.Generator().manual_seed(3))
    ren = [torch.randn(1, 3, 16, *HW, generator=torch.Generator().manual_seed(4 + i)) for i in range(3)]
    a = s.next_chunk(noise, ren)
    b = StreamSession(model, p, HW, seed=77).next_chunk(noise, ren)
    assert torch.equal(a, b)


def test_cancelled_chunk_is_reproduced_exactly(model):
    p = random_prompt(seed=1)
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 8:  # inside the second chunk, after its first pass
            raise KeyboardInterrupt

    s = StreamSession(model, p, HW, seed=3, interrupt=interrupt)
    first = s.next_chunk()
    with pytest.raises(KeyboardInterrupt):
        s.next_chunk()
    second = s.next_chunk()
    third = s.next_chunk()
    ref = run(model, p, 3, chunks=3)
    assert torch.equal(torch.cat([first, second, third], 1), ref)


def test_prompt_switch(model):
    p1, p2 = random_prompt(seed=1), random_prompt(seed=2)
    base = StreamSession(model, p1, HW, seed=4)
    same = StreamSession(model, p1, HW, seed=4)
    switched = StreamSession(model, p1, HW, seed=4)
    for s in (base, same, switched):
        s.next_chunk()
        s.next_chunk()
    same.set_prompt(p1.clone())
    switched.set_prompt(p2)
    a, b, c = base.next_chunk(), same.next_chunk(), switched.next_chunk()
    assert torch.equal(a, b)  # rebuilding the cross-attention cache changes nothing by itself
    assert (a - c).abs().max() > 1e-2
    # the switched stream's new chunk equals a stream that started with p2 but whose cache was
    # written under p1: i.e. it differs from a fresh p2 stream
    fresh = run(model, p2, 4, chunks=3)[:, 6:]
    assert (c - fresh).abs().max() > 1e-3


def test_recache_runs_after_the_next_eviction_over_the_window_that_chunk_sees(model):
    p1, p2 = random_prompt(seed=1), random_prompt(seed=2)
    s = StreamSession(model, p1, HW, seed=4)
    kept = torch.cat([s.next_chunk() for _ in range(4)], dim=1)  # 12 frames: 0-2 sink, 3-11 streamed
    s.flush()
    before = s.cache.k.clone()
    s.set_prompt(p2, recache=True)
    assert torch.equal(s.cache.k, before)  # nothing runs until the next chunk

    passes = []
    original = s._pass
    s._pass = lambda x, t, slot, **kw: (passes.append((x.clone(), t, slot, kw)), original(x, t, slot, **kw))[
        1
    ]
    s.next_chunk()
    x, t, slot, kw = passes[0]
    # window 9 = 3 sink + 6 committed; the new chunk evicted 3, so frames 9-11 stay beside the sink
    assert slot == (3, 6) and t == 0.0 and kw == {"need_output": False, "eager": False}
    torch.testing.assert_close(x, kept[:, 9:12], rtol=0, atol=0)
    assert len(passes) == 1 + 4  # the re-cache, then the chunk's 4 denoising passes

    # the same stream without re-cache: the sink is the same, the re-cached window is not
    ref = StreamSession(model, p1, HW, seed=4)
    for _ in range(4):
        ref.next_chunk()
    ref.set_prompt(p2)
    ref.next_chunk()
    tok = s.cache.frame_tokens
    assert torch.equal(s.cache.k[:, :, : 3 * tok], ref.cache.k[:, :, : 3 * tok])
    assert (s.cache.k[:, :, 3 * tok : 6 * tok] - ref.cache.k[:, :, 3 * tok : 6 * tok]).abs().max() > 1e-3
    # block 0's keys depend only on the frames themselves, so re-caching leaves them unchanged
    torch.testing.assert_close(s.cache.k[0, :, : 6 * tok], ref.cache.k[0, :, : 6 * tok], rtol=0, atol=1e-5)


class _Abandon(Exception):
    pass


def _cache_state(s: StreamSession) -> tuple:
    c = s.cache
    return (c.k.clone(), c.v.clone(), list(c.frame_ids), c.frames, c.next_frame, c.evicted_total, c.pending)


@pytest.mark.parametrize("policy", ["ema", "static", "none"])
@pytest.mark.parametrize("abandon_at", [1, 3])
def test_switch_that_abandons_a_chunk_equals_a_switch_between_chunks(model, policy, abandon_at):
    """A prompt switch may abandon the chunk in flight (live mode): afterwards the session must be exactly
    what a switch before that chunk would have given, caches and noise included."""
    p1, p2 = random_prompt(seed=1), random_prompt(seed=2)
    config = StreamConfig(sink_policy=policy)

    between = StreamSession(model, p1, HW, config, seed=7)
    for _ in range(4):
        between.next_chunk()
    between.set_prompt(p2, recache=True)
    expected = [between.next_chunk() for _ in range(2)]
    between.flush()

    abandoned = StreamSession(model, p1, HW, config, seed=7)
    for _ in range(4):
        abandoned.next_chunk()
    calls = {"n": 0}

    def switch_requested():
        calls["n"] += 1
        if calls["n"] == 1 + abandon_at:  # the first pass is the deferred refresh of chunk 4
            raise _Abandon

    abandoned.interrupt = switch_requested
    with pytest.raises(_Abandon):
        abandoned.next_chunk()
    abandoned.interrupt = None
    abandoned.set_prompt(p2, recache=True)
    got = [abandoned.next_chunk() for _ in range(2)]
    abandoned.flush()

    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    for a, b in zip(_cache_state(abandoned), _cache_state(between)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    for ga, gb in zip(abandoned.generators, between.generators):
        assert torch.equal(ga.get_state(), gb.get_state())


def _switched_between_chunks(model, prompt, recache):
    s = StreamSession(model, random_prompt(seed=1), HW, seed=2)
    for _ in range(4):
        s.next_chunk()
    s.set_prompt(prompt, recache=recache)
    return s, s.next_chunk()


def _abandoned_then_switched(model, first, then, recache_then, abandon_at_call):
    """Switch to ``first`` (re-cache on), abandon the next chunk at the given interrupt call, then
    switch to ``then`` and make that chunk."""
    s = StreamSession(model, random_prompt(seed=1), HW, seed=2)
    for _ in range(4):
        s.next_chunk()
    s.set_prompt(first, recache=True)
    calls = {"n": 0}

    def switch_requested():
        calls["n"] += 1
        if calls["n"] == abandon_at_call:
            raise _Abandon

    s.interrupt = switch_requested
    with pytest.raises(_Abandon):
        s.next_chunk()
    s.interrupt = None
    s.set_prompt(then, recache=recache_then)
    return s, s.next_chunk()


@pytest.mark.parametrize(
    "abandon_at_call, recache_then",
    [
        (1, True),  # before the re-cache pass itself (set_prompt already ran chunk 4's refresh)
        (3, True),  # after the re-cache and the first denoising pass
        # once the window was re-cached its old keys are gone: a switch asking for no re-cache
        # re-caches too, so it equals a re-cached switch between chunks
        (3, False),
    ],
)
def test_newer_switch_after_an_abandoned_switch_equals_one_switch(model, abandon_at_call, recache_then):
    p2, p3 = random_prompt(seed=2), random_prompt(seed=3)
    once, expected = _switched_between_chunks(model, p3, recache=True)
    twice, got = _abandoned_then_switched(model, p2, p3, recache_then, abandon_at_call)
    assert torch.equal(got, expected)
    for a, b in zip(_cache_state(twice), _cache_state(once)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
