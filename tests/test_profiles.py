"""Profiles (rf_core/profiles.py): every profile runs on the tiny model; the pieces that only move memory
(block offload, Wan frames per pass, one latent per decoder call) give exactly the output without them;
the float8 pieces stay within the error their precision predicts; turbo without its packages is a clear
error that leaves the model as it was."""

import dataclasses
import logging

import pytest
import torch
from _vae_helpers import tiny_vae

from rf_core.config import StreamConfig, get_preset
from rf_core.model import attention, fp8
from rf_core.model.fp8 import store_linears_fp8
from rf_core.profiles import ERROR_BOUNDS, PROFILES, apply_profile, profile_decoder
from rf_core.speed import make_fast
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt, randomize_
from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder
from rf_core.vae.taehv import TAEHV, TAEHVConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dataclasses.replace(get_preset("tiny"), num_layers=3)  # 3 blocks through 2 slots: real streaming
HW = (4, 4)
CONFIG = StreamConfig(window_frames=6, ema_alpha=0.8)  # evictions into the EMA sink from chunk 2 on
CHUNKS = 7
# Rounding a tensor to a format of unit roundoff u perturbs the output in proportion to u while the
# perturbation is small, so the same tensors stored in e4m3 (u = 2^-4) instead of bf16 (u = 2^-8) should
# cost 16x the error; 25% more is allowed for the spread of one random sample (measured: 14.6x for the
# KV cache, 16.0x for row-scaled weights). More means saturation, a lost scale or a wrong upcast.
E4M3_OVER_BF16 = 1.25 * 2.0**-4 / 2.0**-8


def model(**kw):
    return random_model(CFG, seed=5, **kw)


def session(m):
    return StreamSession(m, random_prompt(seed=3), HW, CONFIG, seed=9)


def stream(m, chunks=CHUNKS):
    s = session(m)
    return torch.cat([s.next_chunk() for _ in range(chunks)], 1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- every profile runs


def test_quality_is_todays_fast_path():
    info = apply_profile(q := model(), "quality", "cpu")
    assert info.name == "quality" and not info.cuda_graphs and info.offload is None
    assert q.key_storage == "roped" and q.rope.dtype == torch.float32 and q.kv_dtype is None
    assert torch.equal(stream(q, 3), stream(make_fast(model(), compile=False), 3))


def test_low_vram_runs_with_every_piece():
    info = apply_profile(m := model(), "low-vram", "cpu", kv_dtype=torch.float8_e4m3fn)
    assert type(m.blocks[0].ffn[0]).__name__ == "Fp8StoredLinear"
    assert m.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert info.offload is m.offload and info.offload.streamed == [0, 1, 2]
    assert not info.cuda_graphs and info.kv_dtype == m.kv_dtype == torch.float8_e4m3fn
    assert (info.wan_frames_per_pass, info.decoder_latents_per_call) == (1, 1)
    s = session(m)
    z = torch.cat([s.next_chunk() for _ in range(3)], 1)
    assert s.cache.k.dtype == torch.float8_e4m3fn and torch.isfinite(z).all() and z.std() > 0.1
    assert "3 blocks streamed" in info.describe() and "KV cache in float8_e4m3fn" in info.describe()


def test_turbo_without_its_packages_names_them_and_changes_nothing(monkeypatch):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"profile 'turbo': .*needs the sageattention package"):
        apply_profile(m, "turbo", "cpu")
    monkeypatch.setattr(attention, "_sage_fn", lambda: lambda q, k, v, **kw: q)  # sage "installed"
    with pytest.raises(
        ValueError, match=r"profile 'turbo': fp8 GEMMs through torchao need the torchao package"
    ):
        apply_profile(m, "turbo", "cpu")
    monkeypatch.setattr(fp8, "torchao_fp8_config", lambda: object())  # torchao "installed"
    with pytest.raises(ValueError, match="profile 'turbo' runs on a CUDA GPU .*got device cpu"):
        apply_profile(m, "turbo", "cpu")
    assert not m.compiled and m.attn_backend == "auto" and type(m.blocks[0].ffn[0]) is torch.nn.Linear
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_sage_backend_without_the_package_or_off_cuda_is_a_clear_error(monkeypatch):
    with pytest.raises(
        ValueError, match=r"'sage' needs the sageattention package \(pip install sageattention\)"
    ):
        attention.check_backend("sage")
    monkeypatch.setattr(attention, "_sage_fn", lambda: lambda q, k, v, **kw: q)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="'sage' runs on CUDA tensors only"):
        attention.attention(q, q, q, "sage")


def test_bad_profile_settings_are_errors():
    with pytest.raises(
        ValueError, match=r"unknown profile 'fast'; expected one of \['quality', 'low-vram', 'turbo'\]"
    ):
        apply_profile(model(), "fast", "cpu")
    with pytest.raises(
        ValueError, match="kv_dtype torch.float8_e4m3fn is not an option of profile 'quality'"
    ):
        apply_profile(model(), "quality", "cpu", kv_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="kv_dtype torch.float16 is not an option of profile 'low-vram'"):
        apply_profile(model(), "low-vram", "cpu", kv_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"resident_blocks must be 0..3 and only for low-vram, got 4"):
        apply_profile(model(), "low-vram", "cpu", resident_blocks=4)
    apply_profile(m := model(), "quality", "cpu")
    with pytest.raises(ValueError, match="apply a profile once, to a freshly loaded model"):
        apply_profile(m, "low-vram", "cpu")
    assert set(ERROR_BOUNDS) == set(PROFILES)


def test_graphs_with_offload_give_one_warning_and_no_graphs(caplog):
    with caplog.at_level(logging.WARNING, logger="reward_forcing"):
        info = apply_profile(m := model(), "low-vram", "cpu", cuda_graphs=True)
    assert not info.cuda_graphs and not m.cuda_graphs
    assert info.warnings == (
        "profile low-vram: CUDA graphs off: block offload copies weights during each pass",
    )
    assert [r.getMessage() for r in caplog.records] == list(info.warnings)
    with pytest.raises(ValueError, match="CUDA graphs cannot follow block offload"):
        make_fast(m, compile=False, cuda_graphs=True)
    # with every block resident nothing is copied during a pass: graphs stay as asked
    info = apply_profile(model(), "low-vram", "cpu", cuda_graphs=True, resident_blocks=3)
    assert info.cuda_graphs and info.offload is None and info.warnings == ()


# ---------------------------------------------------------------- memory-only pieces are exact


def test_offload_and_decoder_settings_change_no_number():
    """low-vram against the same profile with every block resident (the same fp8 weights): identical
    latents; its decoders against quality's decoders on those latents: identical frames (Wan)."""
    resident = model()
    apply_profile(resident, "low-vram", "cpu", resident_blocks=3)
    info = apply_profile(streamed := model(), "low-vram", "cpu")
    assert info.offload is not None and info.offload.device_bytes < 3 * info.offload.layout.nbytes
    z = stream(streamed, 4)
    assert torch.equal(z, stream(resident, 4))
    assert info.offload.copies > 4 * 5  # the blocks were really copied, pass after pass

    vaes = [tiny_vae(seed=3).make_fast(compile=False) for _ in range(2)]
    quality = WanStreamDecoder(vaes[0], latents_per_step=1)  # today's fast decoder
    low = profile_decoder(WanStreamDecoder(vaes[1], latents_per_step=1), info)
    assert vaes[1].decoder.fast_path.frames_per_pass == 1 and low.latents == 1
    frames = [
        torch.cat([d.decode_chunk(z[:, i : i + 3]) for i in range(0, 12, 3)], 1) for d in (quality, low)
    ]
    assert frames[0].shape == (1, 45, 3, 32, 32) and low.frames_decoded == 45
    assert torch.equal(frames[1], frames[0])


def test_taehv_one_latent_per_call_gives_the_same_frames_up_to_conv_rounding():
    """TAEHV decodes frames as a batch, so fewer at a time may pick other convolution kernels: the
    same frames to fp32 rounding (not bit-identical), and the same count with the startup trim."""
    taehv = randomize_(TAEHV(TAEHVConfig(widths=(8, 8, 8, 8))), seed=5).eval()
    info = apply_profile(model(), "low-vram", "cpu")
    z = torch.randn(1, 9, 16, 4, 4)
    whole, split = TAEHVStreamDecoder(taehv), profile_decoder(TAEHVStreamDecoder(taehv), info)
    a = torch.cat([whole.decode_chunk(z[:, i : i + 3]) for i in range(0, 9, 3)], 1)
    b = torch.cat([split.decode_chunk(z[:, i : i + 3]) for i in range(0, 9, 3)], 1)
    assert a.shape == b.shape == (1, 33, 3, 32, 32) and split.frames_decoded == 33
    assert (a - b).abs().max() <= 1e-6 and a.std() > 0.05


# ---------------------------------------------------------------- float8 pieces: bounded error


def test_row_scaled_fp8_weights_round_each_element_to_nearest():
    """Round to nearest bounds every element: half a spacing of e4m3 (relative 2^-4 in its normal
    range, absolute 2^-10 in scaled units among its subnormals), with the row's amax mapped to 448."""
    m = model()
    w = torch.cat([m.blocks[0].ffn[2].weight, 1e-3 * m.blocks[0].ffn[2].weight[:4]])  # small rows too
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data = w.clone()
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([lin])
    store_linears_fp8(holder, row_scale=True)
    scale = lin.weight_scale
    assert scale.shape == (w.shape[0], 1) and torch.equal(scale, w.abs().amax(1, keepdim=True) / 448)
    deq = lin.weight.float() * scale
    assert ((deq - w).abs() <= 2.0**-4 * w.abs() + 2.0**-10 * scale).all()
    assert (lin.weight.float().abs().amax(1) == 448).all()  # each row uses e4m3's whole range
    x = torch.randn(3, w.shape[1])
    torch.testing.assert_close(lin(x), x @ deq.T + lin.bias, rtol=1e-5, atol=1e-6)


def test_fp8_weights_and_kv_cache_error_is_what_their_precision_predicts():
    """Latents over 7 chunks against an fp32 run, against the same tensors stored in bf16 (see
    E4M3_OVER_BF16); bf16 storage is ``store_linears_fp8(dtype=bfloat16)`` and a bf16 KV cache."""
    reference = stream(model())

    weights_bf16 = stream(store_linears_fp8(model(), dtype=torch.bfloat16))
    weights_fp8 = stream(store_linears_fp8(model(), row_scale=True))
    kv = {}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        m = model()
        m.kv_dtype = dtype
        kv[dtype] = stream(m)
    info = apply_profile(m := model(), "low-vram", "cpu", kv_dtype=torch.float8_e4m3fn)
    low_vram = stream(m)

    err = {
        "weights bf16": rel(weights_bf16, reference),
        "weights fp8": rel(weights_fp8, reference),
        "kv bf16": rel(kv[torch.bfloat16], reference),
        "kv fp8": rel(kv[torch.float8_e4m3fn], reference),
        "low-vram": rel(low_vram, reference),
    }
    assert 0 < err["weights bf16"] < err["weights fp8"] <= E4M3_OVER_BF16 * err["weights bf16"], err
    assert 0 < err["kv bf16"] < err["kv fp8"] <= E4M3_OVER_BF16 * err["kv bf16"], err
    # both roundings together: the errors of independent roundings add at most linearly
    assert 0 < err["low-vram"] <= E4M3_OVER_BF16 * (err["weights bf16"] + err["kv bf16"]), err
    assert err["low-vram"] <= info.error_bound  # the documented full-size bound holds here too
