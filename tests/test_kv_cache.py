"""Sink policies: the 21-frame trace of reference-algorithm.md §2.5 and the generalised cases."""

import pytest
import torch

from rf_core.config import StreamConfig
from rf_core.model.dit import sinusoidal_embedding
from rf_core.model.kv_cache import CacheFullError
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt

H, W = 4, 6
T = (H // 2) * (W // 2)  # tokens per frame


def layer0_clean_keys(model, x0):
    """Independent computation of block 0's keys for a clean chunk at t = 0: they depend only on
    the chunk itself (no attention happens before block 0's projections)."""
    blk = model.blocks[0]
    with torch.no_grad():
        tok = model.patch_embedding(x0.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)
        e = model.time_embedding(sinusoidal_embedding(model.cfg.freq_dim, torch.zeros(1)).float())
        e0 = model.time_projection(e).view(1, 1, 6, -1)
        m = blk.modulation.unsqueeze(1) + e0
        h = torch.nn.functional.layer_norm(tok, (model.cfg.dim,), eps=1e-6).view(1, x0.shape[1], T, -1)
        h = (h * (1 + m[:, :, 1:2]) + m[:, :, 0:1]).flatten(1, 2)
        k = blk.self_attn.k(h)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * blk.self_attn.norm_k.weight
    return k.view(1, x0.shape[1] * T, model.cfg.num_heads, -1)


@pytest.mark.parametrize("alpha", [0.999, 0.8])
@pytest.mark.parametrize("layers_per_step", ["all", "one"])
def test_ema_sink_trace_21_frames(alpha, layers_per_step):
    model = random_model(seed=11)
    cfg = StreamConfig(ema_alpha=alpha)  # window 9, sink 3, chunk 3
    s = StreamSession(model, random_prompt(seed=1), (H, W), cfg, seed=3)
    if layers_per_step == "one":  # evict layer by layer, as full-size models do in groups
        s.cache.evict_group_bytes = 1
        assert len(s.cache._layer_groups()) == model.cfg.num_layers > 1
    else:
        assert len(s.cache._layer_groups()) == 1
    clean_k, clean_v = [], []  # per chunk, all layers, as written by its context pass
    sink_k = sink_v = None
    for c in range(7):
        x0 = s.next_chunk()
        s.flush()  # run the chunk's (deferred) context pass
        start = min(c, 2) * 3 * T  # the chunk sits in slot A, B, then always C
        clean_k.append(s.cache.k[:, :, start : start + 3 * T].clone())
        clean_v.append(s.cache.v[:, :, start : start + 3 * T].clone())
        # independent check of the recorded keys on block 0
        assert torch.allclose(clean_k[c][0], layer0_clean_keys(model, x0), atol=1e-5)
        # hand-computed sink: S_2 = c0, S_c = a*S_{c-1} + (1-a)*c_{c-2}
        if c <= 2:
            sink_k, sink_v = clean_k[0].double(), clean_v[0].double()
        else:
            sink_k = alpha * sink_k + (1 - alpha) * clean_k[c - 2].double()
            sink_v = alpha * sink_v + (1 - alpha) * clean_v[c - 2].double()
        assert s.cache.frames == min(3 * (c + 1), 9) and s.frames_done == 3 * (c + 1)
        assert torch.allclose(s.cache.k[:, :, : 3 * T].double(), sink_k, atol=1e-6)
        assert torch.allclose(s.cache.v[:, :, : 3 * T].double(), sink_v, atol=1e-6)
        if c >= 2:  # slot B = clean c-1, slot C = clean c
            assert torch.equal(s.cache.k[:, :, 3 * T : 6 * T], clean_k[c - 1])
    # closed form of §2.5: S6 = a^4 c0 + (1-a)(a^3 c1 + a^2 c2 + a c3 + c4)
    a = alpha
    closed = a**4 * clean_k[0].double() + (1 - a) * (
        a**3 * clean_k[1].double()
        + a**2 * clean_k[2].double()
        + a * clean_k[3].double()
        + clean_k[4].double()
    )
    assert torch.allclose(s.cache.k[:, :, : 3 * T].double(), closed, atol=1e-6)
    assert not torch.allclose(closed, clean_k[0].double(), atol=1e-4)  # the blend really moved the sink


def test_static_sink_keeps_first_chunk_and_none_has_no_sink():
    model = random_model(seed=2)
    st = StreamSession(model, random_prompt(), (H, W), StreamConfig(sink_policy="static"), seed=1)
    st.next_chunk()
    st.flush()
    first = st.cache.k[:, :, : 3 * T].clone()
    for _ in range(5):
        st.next_chunk()
    st.flush()
    assert torch.equal(st.cache.k[:, :, : 3 * T], first)

    nn_ = StreamSession(
        model, random_prompt(), (H, W), StreamConfig(sink_policy="none", window_frames=6), seed=1
    )
    chunks = [nn_.next_chunk() for _ in range(4)]
    nn_.flush()
    assert nn_.cache.frame_ids == [6, 7, 8, 9, 10, 11]  # only the two most recent chunks
    # same first chunk as the static stream (nothing evicted yet), later ones differ
    assert torch.allclose(chunks[0], StreamSession(model, random_prompt(), (H, W), seed=1).next_chunk())


def test_global_policy_stops_at_max_frames():
    s = StreamSession(
        random_model(), random_prompt(), (H, W), StreamConfig(sink_policy="global", max_frames=6)
    )
    s.next_chunk()
    s.next_chunk()
    with pytest.raises(CacheFullError, match="max_frames=6"):
        s.next_chunk()


def test_chunk_smaller_than_sink_fills_sink_then_blends_by_phase():
    """chunk 1, sink 3, window 5: frames 0-2 form the sink; evicted frames 3, 4, 5, 6 blend into sink
    slots 0, 1, 2, 0 (hand trace)."""
    a = 0.5
    model = random_model(seed=4)
    cfg = StreamConfig(chunk_frames=1, sink_frames=3, window_frames=5, ema_alpha=a)
    s = StreamSession(model, random_prompt(), (H, W), cfg, seed=2)
    keys = {}
    for f in range(9):
        s.next_chunk()
        s.flush()
        pos = min(f, 4)
        keys[f] = s.cache.k[:, :, pos * T : (pos + 1) * T].double().clone()
    slot = [keys[0], keys[1], keys[2]]
    for ev in (3, 4, 5, 6):  # frames 5..8 arriving evict 3..6
        j = (ev - 3) % 3
        slot[j] = a * slot[j] + (1 - a) * keys[ev]
    for j in range(3):
        assert torch.allclose(s.cache.k[:, :, j * T : (j + 1) * T].double(), slot[j], atol=1e-6)
    assert s.cache.frame_ids == [None, None, None, 7, 8]


@pytest.mark.parametrize("policy", ["ema", "static", "none"])
@pytest.mark.parametrize("layers_per_step", ["all", "one"])
def test_window_frames_keep_their_clean_keys_when_more_stay_than_leave(policy, layers_per_step):
    """chunk 2, sink 3, window 9: each eviction moves 4 kept frames down by 2 slots, so a move lands
    where another frame is still to be moved from. Every non-sink slot must hold exactly the keys and
    values its frame's context pass wrote."""
    cfg = StreamConfig(chunk_frames=2, sink_frames=3, window_frames=9, sink_policy=policy, ema_alpha=0.5)
    s = StreamSession(random_model(seed=6), random_prompt(seed=2), (H, W), cfg, seed=5)
    if layers_per_step == "one":
        s.cache.evict_group_bytes = 1
    c = s.cache
    written = {}  # absolute frame -> (keys, values) as its context pass wrote them
    moved = False
    for _ in range(9):
        s.next_chunk()
        s.flush()
        for slot in range(c.frames - 2, c.frames):
            sl = slice(slot * T, (slot + 1) * T)
            written[c.frame_ids[slot]] = (c.k[:, :, sl].clone(), c.v[:, :, sl].clone())
        for slot in range(c.sink, c.frames):
            frame = c.frame_ids[slot]
            moved |= slot != frame
            sl = slice(slot * T, (slot + 1) * T)
            assert torch.equal(c.k[:, :, sl], written[frame][0]), (slot, frame)
            assert torch.equal(c.v[:, :, sl], written[frame][1]), (slot, frame)
    assert moved and c.evicted_total >= 8


def test_forty_chunks_constant_memory():
    s = StreamSession(random_model(), random_prompt(), (H, W), seed=0)
    ptrs = (s.cache.k.data_ptr(), s.cache.v.data_ptr())
    sizes = []
    for _ in range(42):
        s.next_chunk()
        sizes.append(s.state_nbytes())
    assert len(set(sizes[3:])) == 1
    assert (s.cache.k.data_ptr(), s.cache.v.data_ptr()) == ptrs
    assert len(s.recent) == 9 and s.frames_done == 126
