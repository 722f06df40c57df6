"""Schedule constants and RoPE against independent formulations."""

import math

import torch

from rf_core.model.dit import WanDiT
from rf_core.model.rope import RopeTables, apply_rope, axis_dims
from rf_core.schedule import FlowSchedule
from rf_core.tiny import random_model


def test_warped_steps_and_sigmas_match_reference_table():
    s = FlowSchedule(5.0)
    ts = s.warp([1000, 750, 500, 250])
    # sigma = 5u / (1 + 4u) for u = 1, .75, .5, .25 (reference-algorithm.md §4.1)
    for t, u in zip(ts, [1.0, 0.75, 0.5, 0.25]):
        assert math.isclose(t, 1000 * 5 * u / (1 + 4 * u), rel_tol=1e-6)
        assert math.isclose(float(s.sigma(t)), 5 * u / (1 + 4 * u), rel_tol=1e-6)
    assert math.isclose(ts[1], 937.5, rel_tol=1e-7)
    assert math.isclose(float(s.sigma(0.0)), 0.004980, abs_tol=1e-6)  # last table entry


def test_flow_x0_round_trip():
    s = FlowSchedule(5.0)
    x0, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = 833.3333
    xt = s.add_noise(x0, eps, t)
    v = eps - x0
    assert torch.allclose(s.x0_from_flow(v, xt, t), x0, atol=1e-5)
    assert torch.allclose(s.flow_from_x0(x0, xt, t), v, atol=1e-4)


def test_rope_matches_complex128_formulation():
    d, f0, f, h, w = 128, 3, 2, 3, 4
    assert axis_dims(d) == (22, 21, 21)
    x = torch.randn(1, f * h * w, 2, d, dtype=torch.float64)
    cos, sin = RopeTables(d).get(f0, f, h, w, x.device)
    out = apply_rope(x, cos, sin)

    def table(n, dim):
        ang = torch.outer(
            torch.arange(1024).double(), 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim)
        )
        return torch.polar(torch.ones_like(ang), ang)

    ft, fh, fw = table(1024, 44), table(1024, 42), table(1024, 42)
    ref = torch.empty_like(x)
    i = 0
    for a in range(f):
        for b in range(h):
            for c in range(w):
                rot = torch.cat([ft[f0 + a], fh[b], fw[c]])
                z = torch.view_as_complex(x[0, i].reshape(2, -1, 2).contiguous())
                ref[0, i] = torch.view_as_real(z * rot).reshape(2, d)
                i += 1
    assert torch.allclose(out, ref, atol=1e-12)


def test_unpatchify_channel_order():
    """Output channel c at (frame, 2*row + q, 2*col + r) comes from index ((p*2+q)*2+r)*16+c."""
    m = random_model()
    grid = (1, 2, 3)
    out = torch.arange(6 * 64, dtype=torch.float32).view(1, 6, 64)
    x = m.unpatchify(out, grid)
    assert x.shape == (1, 16, 1, 4, 6)
    for tok, (hh, ww) in enumerate([(a, b) for a in range(2) for b in range(3)]):
        for q in range(2):
            for r in range(2):
                for c in (0, 7, 15):
                    assert x[0, c, 0, 2 * hh + q, 2 * ww + r] == out[0, tok, (q * 2 + r) * 16 + c]


def test_full_size_state_dict_keys_and_counts():
    from rf_core.config import PRESETS

    with torch.device("meta"):
        m13 = WanDiT(PRESETS["wan2.1-t2v-1.3b"])
        m14 = WanDiT(PRESETS["wan2.1-t2v-14b"])
    sd = m13.state_dict()
    assert len(sd) == 825 and len(m14.state_dict()) == 1095
    assert sum(p.numel() for p in m13.parameters()) == 1_418_996_800
    assert sum(p.numel() for p in m14.parameters()) == 14_288_491_584
    assert sd["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)
    assert sd["time_projection.1.weight"].shape == (9216, 1536)
    assert sd["head.modulation"].shape == (1, 2, 1536)
    assert sd["blocks.29.ffn.0.weight"].shape == (8960, 1536)
    assert sd["blocks.0.norm3.bias"].shape == (1536,)
    assert "blocks.0.norm1.weight" not in sd and "head.norm.weight" not in sd
