"""The fast path (every speed switch that runs on CPU) equals the plain path on the tiny model."""

import pytest
import torch

from rf_core.config import StreamConfig
from rf_core.model.rope import apply_rope
from rf_core.speed import make_fast
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt

HW = (4, 6)


def stream(model, chunks=5, **kw):
    s = StreamSession(model, random_prompt(seed=3), HW, seed=9, **kw)
    return torch.cat([s.next_chunk() for _ in range(chunks)], 1)


def roped_at_slots(session):
    """The raw-storage cache's keys roped at their slot positions (what roped storage holds)."""
    c = session.cache
    rows, cols = session.grid_hw
    cos, sin = session.model.rope.get(0, c.frames, rows, cols, "cpu")
    return torch.stack(
        [apply_rope(c.k[i, :, : c.frames * c.frame_tokens], cos, sin) for i in range(len(c.k))]
    )


@pytest.mark.parametrize(
    "config",
    [
        StreamConfig(ema_alpha=0.8),  # EMA sink: evicted keys rotated to the sink's positions
        StreamConfig(chunk_frames=1, sink_frames=3, window_frames=5, ema_alpha=0.5),  # per-frame phases
        StreamConfig(sink_policy="none", window_frames=6),  # the whole window moves
    ],
)
def test_roped_key_storage_equals_raw_storage(config):
    m = random_model(seed=5)
    sessions = {
        ks: StreamSession(m, random_prompt(seed=3), HW, config, seed=9, key_storage=ks)
        for ks in ("raw", "roped")
    }
    sessions["roped"].cache.evict_group_bytes = 1  # layer by layer: the grouping must not matter
    outs = {
        ks: torch.cat([s.next_chunk() for _ in range(24 // config.chunk_frames)], 1)
        for ks, s in sessions.items()
    }
    for s in sessions.values():
        s.flush()
    assert torch.allclose(outs["roped"], outs["raw"], atol=1e-5)
    raw, roped = sessions["raw"].cache, sessions["roped"].cache
    n = raw.frames * raw.frame_tokens
    assert roped.frames == raw.frames and raw.evicted_total > 0
    assert torch.allclose(roped.k[:, :, :n], roped_at_slots(sessions["raw"]), atol=1e-5)
    assert not torch.allclose(roped.k[:, :, :n], raw.k[:, :, :n], atol=1e-2)  # really stored roped
    assert torch.allclose(roped.v, raw.v, atol=1e-5)


def test_fast_path_equals_plain_path():
    plain = stream(random_model(seed=5), key_storage="raw")
    fast_model = make_fast(random_model(seed=5), compile=True, rope_fp32=True)
    fast = stream(fast_model)
    assert fast_model.compiled and fast_model.rope.dtype == torch.float32
    assert fast_model.key_storage == "roped"
    rel = ((fast - plain).norm() / plain.norm()).item()
    assert rel < 1e-5, rel


def test_fp8_linear_equals_dequantised_matmul_and_stays_close():
    from rf_core.model.fp8 import Fp8Linear, quantize

    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    fp8 = Fp8Linear(lin)
    xq, xs = quantize(x.reshape(-1, 64))
    ref = (xq.double() * xs.double()) @ (
        fp8.weight_fp8.double() * fp8.weight_scale.double()
    ).t() + lin.bias.double()
    out = fp8(x)
    assert torch.allclose(out.reshape(-1, 32).double(), ref, atol=1e-4)
    exact = lin(x)
    assert ((out - exact).norm() / exact.norm()) < 0.1  # e4m3 keeps 3 mantissa bits


def test_fp8_model_stays_close_to_plain():
    plain = stream(random_model(seed=5), chunks=2)
    model = make_fast(random_model(seed=5), compile=False, fp8=True)
    assert sum(type(m).__name__ == "Fp8Linear" for m in model.modules()) == 10 * model.cfg.num_layers
    fast = stream(model, chunks=2)
    rel = ((fast - plain).norm() / plain.norm()).item()
    assert 0 < rel < 0.2, rel


def test_recache_on_a_compiled_model_runs_eagerly_and_matches():
    """The one-off re-cache pass must not compile a new graph shape, and gives the same cache."""
    import torch._dynamo

    plain = StreamSession(random_model(seed=5), random_prompt(seed=3), HW, seed=9)
    fast = StreamSession(make_fast(random_model(seed=5)), random_prompt(seed=3), HW, seed=9)
    for s in (plain, fast):
        for _ in range(4):
            s.next_chunk()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for s in (plain, fast):
        s.set_prompt(random_prompt(seed=4), recache=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before
    n = plain.cache.frames * plain.cache.frame_tokens
    assert torch.allclose(fast.cache.k[:, :, :n], roped_at_slots(plain), atol=1e-4)
    assert torch.allclose(fast.next_chunk(), plain.next_chunk(), atol=1e-4)
