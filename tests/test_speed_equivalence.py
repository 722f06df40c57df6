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
    assert torch.allclose(fast.cache.k, plain.cache.k, atol=1e-4)
    assert torch.allclose(fast.next_chunk(), plain.next_chunk(), atol=1e-4)
