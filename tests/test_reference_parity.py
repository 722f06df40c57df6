"""Numerical parity with the reference Reward Forcing code (opt-in): set RF_REFERENCE_DIR to a
Reward-Forcing checkout, and RF_REFERENCE_DEPS to a folder holding diffusers and einops if they are not
importable (``pip install --target DIR diffusers==0.31.0 einops``). Random weights, fp32, CPU, the
real 60x104 latent grid; about 3 minutes on 2 cores. The comparisons are benchmarks/reference_parity.py's.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REF_DIR = os.environ.get("RF_REFERENCE_DIR")
TOL = 1e-4

pytestmark = [
    pytest.mark.reference,
    pytest.mark.skipif(not REF_DIR, reason="opt-in: set RF_REFERENCE_DIR to a Reward-Forcing checkout"),
]


def _parity_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_parity.py"
    spec = importlib.util.spec_from_file_location("reference_parity", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def parity():
    import torch

    rp = _parity_module()
    ref = rp.import_reference(REF_DIR, os.environ.get("RF_REFERENCE_DEPS"))
    model = rp.random_model(rp.tiny_config(dim=24, heads=2, layers=2), seed=0, attn_backend="sdpa")
    with torch.no_grad():
        return rp.forward_parity(ref, model), rp.rollout_parity(ref, model, frames=21)


def test_single_forwards_match_the_reference(parity):
    fwd, _ = parity
    assert fwd["bidirectional_max_abs"] > 1 and fwd["cached_first_chunk_x0_max_abs"] > 1  # non-trivial
    assert fwd["bidirectional_max_abs_diff"] <= TOL
    assert fwd["cached_first_chunk_x0_max_abs_diff"] <= TOL
    assert fwd["cached_first_chunk_cache_k_max_abs_diff"] <= TOL
    assert fwd["cached_first_chunk_cache_v_max_abs_diff"] <= TOL


@pytest.mark.parametrize("variant", ["raw", "roped"])
def test_rollout_matches_the_reference_chunk_by_chunk(parity, variant):
    _, roll = parity
    r = roll[variant]
    assert roll["chunks"] == 7 and min(roll["per_chunk_max_abs"]) > 1
    assert r["per_chunk_max_abs_diff"] == pytest.approx([0.0] * 7, abs=TOL)
    assert r["cache_k_max_abs_diff"] <= TOL and r["cache_v_max_abs_diff"] <= TOL  # EMA sink included


def test_comparison_resolves_the_ema_sink(parity):
    """A static sink agrees until the first eviction (chunk 3) and then differs by more than the
    tolerance: the rollout comparison would catch a wrong sink update."""
    _, roll = parity
    static = roll["static_sink_per_chunk_max_abs_diff"]
    assert max(static[:3]) <= TOL
    assert min(static[3:]) > TOL
