"""Wan 2.1 decoder speed work: sub-pixel upsampling and the pure-function (compilable) fast path."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from _vae_helpers import tiny_vae

from rf_core.vae.stream_decode import WanStreamDecoder
from rf_core.vae.wan_fast_decode import FastDecoderPath, double_time_step, residual_step
from rf_core.vae.wan_layers import CausalCache, ResidualBlock, Upsample, subpixel_upsample
from rf_core.vae.wan_vae import WanVAE


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("gamma") else 0.2 * torch.randn_like(p))
    return module.eval().requires_grad_(False)


def nearest_then_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The original upsampling, frame by frame: nearest 2x, then the 3x3 conv with padding 1."""
    frames = [
        F.conv2d(F.interpolate(x[:, :, t], scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
        for t in range(x.shape[2])
    ]
    return torch.stack(frames, dim=2)


# ---------------------------------------------------------------- sub-pixel upsampling


@pytest.mark.parametrize("hw", [(5, 7), (4, 6), (1, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_equals_nearest_then_conv_fp64(hw, channels_last):
    up = randomise(Upsample(12, temporal=False)).double()
    x = torch.randn(2, 12, 3, *hw, dtype=torch.float64)
    if channels_last:
        up.resample.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    conv = up.resample[1]
    expected = nearest_then_conv(x, conv.weight, conv.bias)
    got = up(x)
    assert got.shape == (2, 6, 3, 2 * hw[0], 2 * hw[1])
    assert (got - expected).abs().max() <= 1e-12
    # The layout is kept: the next conv sees the same memory format as before.
    assert got.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    assert got.is_contiguous() != channels_last


def test_subpixel_upsample_bf16_error_close_to_the_original_path():
    up = Upsample(64, temporal=False).to(torch.bfloat16).eval().requires_grad_(False)
    conv = up.resample[1]
    x = torch.randn(1, 64, 2, 9, 11).to(torch.bfloat16)
    exact = nearest_then_conv(x.double(), conv.weight.double(), conv.bias.double())
    err_old = nearest_then_conv(x, conv.weight, conv.bias).double() - exact
    err_new = up(x).double() - exact
    assert up(x).dtype == torch.bfloat16
    # Folding sums up to four bf16 weights and rounds once: measured 1.43x the RMS error of the
    # original bf16 path (whose error is mostly the output rounding).
    assert err_new.pow(2).mean().sqrt() <= 2 * err_old.pow(2).mean().sqrt()
    assert err_new.abs().max() <= 2 * err_old.abs().max()


def test_upsample_keeps_checkpoint_keys_and_refolds_when_weights_change():
    up = randomise(Upsample(8, temporal=True))
    assert sorted(up.state_dict()) == [
        "resample.1.bias",
        "resample.1.weight",
        "time_conv.bias",
        "time_conv.weight",
    ]
    x = torch.randn(1, 8, 1, 3, 4)
    conv = up.resample[1]
    up(x)
    with torch.no_grad():  # in place, as load_state_dict does
        conv.weight.mul_(-2.0)
        conv.bias.add_(1.0)
    torch.testing.assert_close(up(x), nearest_then_conv(x, conv.weight, conv.bias), rtol=0, atol=1e-5)
    up.double()  # new storage and dtype
    x = x.double()
    torch.testing.assert_close(up(x), nearest_then_conv(x, conv.weight, conv.bias), rtol=0, atol=1e-12)


def test_upsample_with_inference_mode_weights_sees_in_place_changes():
    with torch.inference_mode():  # as ComfyUI loads and runs models
        up = randomise(Upsample(8, temporal=False))
        x = torch.randn(1, 8, 2, 3, 4)
        conv = up.resample[1]
        up(x)
        conv.weight.mul_(-2.0)
        torch.testing.assert_close(up(x), nearest_then_conv(x, conv.weight, conv.bias), rtol=0, atol=1e-5)
    assert conv.weight.is_inference()


# ---------------------------------------------------------------- fast path


def stream(vae: WanVAE, z: torch.Tensor, split: list[int]) -> tuple[torch.Tensor, WanStreamDecoder]:
    decoder = WanStreamDecoder(vae, latents_per_step=1)
    pieces, start = [], 0
    for n in split:
        pieces.append(decoder.decode_chunk(z[:, start : start + n]))
        start += n
    return torch.cat(pieces, dim=1), decoder


@pytest.mark.parametrize("frames_per_pass", [None, 1, 3])
def test_fast_path_equals_module_path_streamed_and_whole_fp64(frames_per_pass):
    vae = tiny_vae(seed=3).double()
    z = torch.randn(1, 6, 16, 4, 6, dtype=torch.float64)
    split = [2, 1, 3]
    plain, plain_dec = stream(vae, z, split)
    whole = vae.decode(z.transpose(1, 2), latents_per_step=None)
    assert (plain.gt(0.02) & plain.lt(0.98)).float().mean() > 0.9  # not a comparison of clamped values

    vae.make_fast(compile=False, frames_per_pass=frames_per_pass)
    assert vae.decoder.fast_path is not None
    assert vae.decoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    fast, fast_dec = stream(vae, z, split)
    assert fast.shape == plain.shape == (1, 1 + 4 * 5, 3, 32, 48)
    assert (fast - plain).abs().max() <= 1e-12
    # The causal state is the same: same layers, same frames.
    assert plain_dec._cache.history.keys() == fast_dec._cache.history.keys()
    assert plain_dec._cache.started == fast_dec._cache.started
    for conv, frames in plain_dec._cache.history.items():
        assert (fast_dec._cache.history[conv] - frames).abs().max() <= 1e-10
    assert fast_dec.cache_storage_bytes() == fast_dec.cache_elements() * 8  # compact copies only
    # A whole video (cache=None) runs the fast path from a fresh stream.
    assert (vae.decode(z.transpose(1, 2), latents_per_step=None) - whole).abs().max() <= 1e-12


def test_fast_path_traces_full_graphs_and_stops_recompiling():
    """Dynamo traces every piece whole (fullgraph=True raises on a graph break) and the steady
    state reuses the graphs of the first chunks. ``aot_eager`` traces like Inductor but skips
    its C++ code generation, which is slow on CPU; Inductor itself is checked below."""
    vae = tiny_vae(seed=4)
    z = torch.randn(1, 5, 16, 2, 3)
    plain, _ = stream(vae, z, [1, 2, 2])
    vae.make_fast(compile=False)
    vae.decoder.fast_path = FastDecoderPath(compile=True, backend="aot_eager")
    torch._dynamo.reset()
    decoder = WanStreamDecoder(vae, latents_per_step=1)
    pieces = [decoder.decode_chunk(z[:, :1]), decoder.decode_chunk(z[:, 1:3])]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    pieces.append(decoder.decode_chunk(z[:, 3:5]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert (torch.cat(pieces, dim=1) - plain).abs().max() <= 1e-5


def test_inductor_compiled_pieces_equal_the_eager_modules():
    """The smallest Inductor check (CPU code generation is slow): one channels-last residual block
    with a channel change over three passes of a stream, the temporal doubling and the sub-pixel
    upsampling."""
    torch._dynamo.reset()
    cl = torch.channels_last_3d
    block = randomise(ResidualBlock(4, 6))
    for conv in (block.residual[2], block.residual[6], block.shortcut):
        conv.to(memory_format=cl)
    cache = CausalCache()
    xs = [torch.randn(1, 4, t, 3, 5).contiguous(memory_format=cl) for t in (1, 2, 2)]
    wants = [block(x, cache) for x in xs]
    n1, _, c1, n2, _, _, c2 = block.residual
    weights = (n1.gamma, c1.weight, c1.bias, n2.gamma, c2.weight, c2.bias)
    shortcut = (block.shortcut.weight, block.shortcut.bias)
    compiled = torch.compile(residual_step, fullgraph=True, dynamic=False)
    h1 = torch.zeros(1, 4, 2, 3, 5).contiguous(memory_format=cl)
    h2 = torch.zeros(1, 6, 2, 3, 5).contiguous(memory_format=cl)
    for i, (x, want) in enumerate(zip(xs, wants)):
        if i == 2:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        got, h1, h2 = compiled(x, h1, h2, *weights, *shortcut)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The third pass has the second's shapes and strides: no new graph.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for mine, theirs in ((h1, cache.history[c1]), (h2, cache.history[c2])):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
        # A compact copy, not a view that keeps the whole padded input alive.
        assert mine.untyped_storage().nbytes() == mine.numel() * mine.element_size()
        assert mine.is_contiguous(memory_format=cl)

    up = randomise(Upsample(4, temporal=True))
    x = torch.randn(1, 4, 2, 3, 5)
    weight, bias = up.time_conv.weight, up.time_conv.bias
    y = F.conv3d(F.pad(x, (0, 0, 0, 0, 2, 0)), weight, bias)  # zero history at stream start
    pairs = torch.stack([y[:, :4], y[:, 4:]], dim=3).flatten(2, 3)  # frame pairs in time order
    doubled, history = torch.compile(double_time_step, fullgraph=True, dynamic=False)(
        x, torch.zeros(1, 4, 2, 3, 5), weight, bias
    )
    torch.testing.assert_close(doubled, pairs, rtol=0, atol=1e-5)
    assert torch.equal(history, x)

    x = pairs.contiguous(memory_format=torch.channels_last_3d)
    up.resample.to(memory_format=torch.channels_last)
    upsampled = torch.compile(subpixel_upsample, fullgraph=True, dynamic=False)(x, *up.phase_weights())
    conv = up.resample[1]
    torch.testing.assert_close(upsampled, nearest_then_conv(x, conv.weight, conv.bias), rtol=0, atol=1e-5)
    assert upsampled.is_contiguous(memory_format=torch.channels_last_3d)
