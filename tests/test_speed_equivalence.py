"""The fast path (every speed switch that runs on CPU) equals the plain path on the tiny model."""

import torch

from rf_core.speed import make_fast
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt

HW = (4, 6)


def stream(model, chunks=5, **kw):
    s = StreamSession(model, random_prompt(seed=3), HW, seed=9, **kw)
    return torch.cat([s.next_chunk() for _ in range(chunks)], 1)


def test_roped_key_cache_is_exact():
    m = random_model(seed=5)
    assert torch.equal(stream(m, rope_cache=True), stream(m, rope_cache=False))


def test_fast_path_equals_plain_path():
    plain = stream(random_model(seed=5), rope_cache=False)
    fast_model = make_fast(random_model(seed=5), compile=True, rope_fp32=True)
    fast = stream(fast_model)
    assert fast_model.compiled and fast_model.rope.dtype == torch.float32
    rel = ((fast - plain).norm() / plain.norm()).item()
    assert rel < 1e-5, rel
