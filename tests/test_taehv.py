"""TAEHV tiny decoder: taew2_1 key layout, loading, and streaming = parallel = per-frame decoding."""

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rf_core.io.safe_load import CheckpointError
from rf_core.vae.stream_decode import TAEHVStreamDecoder
from rf_core.vae.taehv import TAEHV, MemBlock, TAEHVConfig, TGrow, load_taehv

SMALL = (12, 8, 6, 4)  # all widths differ, so that a mix-up in reading them is caught


def taew2_1_decoder_shapes(widths=(256, 128, 64, 64), latent=16) -> dict[str, tuple[int, ...]]:
    """Decoder keys and shapes of taew2_1, written out from the index list of reference-algorithm.md §7.4."""
    n0, n1, n2, n3 = widths
    shapes = {"decoder.1.weight": (n0, latent, 3, 3), "decoder.1.bias": (n0,)}

    def memblock(i, n):
        shapes[f"decoder.{i}.conv.0.weight"] = (n, 2 * n, 3, 3)
        for j in (2, 4):
            shapes[f"decoder.{i}.conv.{j}.weight"] = (n, n, 3, 3)
        for j in (0, 2, 4):
            shapes[f"decoder.{i}.conv.{j}.bias"] = (n,)

    for i in (3, 4, 5):
        memblock(i, n0)
    shapes["decoder.7.conv.weight"] = (n0, n0, 1, 1)  # TGrow, stride 1
    shapes["decoder.8.weight"] = (n1, n0, 3, 3)
    for i in (9, 10, 11):
        memblock(i, n1)
    shapes["decoder.13.conv.weight"] = (2 * n1, n1, 1, 1)  # TGrow, stride 2
    shapes["decoder.14.weight"] = (n2, n1, 3, 3)
    for i in (15, 16, 17):
        memblock(i, n2)
    shapes["decoder.19.conv.weight"] = (2 * n2, n2, 1, 1)
    shapes["decoder.20.weight"] = (n3, n2, 3, 3)
    shapes["decoder.22.weight"] = (3, n3, 3, 3)
    shapes["decoder.22.bias"] = (3,)
    return shapes


def synthetic_file_tensors(widths=SMALL, oversized_tgrow=True) -> dict[str, torch.Tensor]:
    """A taew2_1-like file: decoder tensors, some encoder tensors, and a TGrow stored for 2 frames."""
    sd = {k: torch.randn(s) * 0.3 for k, s in taew2_1_decoder_shapes(widths).items()}
    if oversized_tgrow:
        sd["decoder.7.conv.weight"] = torch.randn(2 * widths[0], widths[0], 1, 1) * 0.3
    sd["encoder.0.weight"] = torch.randn(64, 3, 3, 3)
    sd["encoder.2.conv.weight"] = torch.randn(64, 128, 1, 1)
    sd["encoder.17.bias"] = torch.randn(16)
    return sd


def test_full_size_layout_matches_taew2_1_on_meta():
    with torch.device("meta"):
        model = TAEHV()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == taew2_1_decoder_shapes()
    assert model.config.frames_to_trim == 3 and model.config.time_stride == 4


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_synthetic_file(tmp_path, suffix):
    sd = synthetic_file_tensors()
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.half() for k, v in sd.items()}, str(path))
    else:
        torch.save({k: v.half() for k, v in sd.items()}, path)
    model = load_taehv(path, dtype=torch.float32)
    assert model.config == TAEHVConfig(widths=SMALL)
    loaded = model.state_dict()
    assert not any(k.startswith("encoder.") for k in loaded)
    for k, v in loaded.items():
        assert v.dtype == torch.float32
        source = sd[k].half().float()
        if k == "decoder.7.conv.weight":
            source = source[SMALL[0] :]  # the last output channels belong to the last frame
        assert torch.equal(v, source), k


def test_load_errors(tmp_path):
    sd = synthetic_file_tensors(oversized_tgrow=False)
    del sd["decoder.9.conv.2.bias"]
    sd["decoder.99.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        load_taehv(path)
    msg = str(err.value)
    assert str(path) in msg and "decoder.9.conv.2.bias" in msg and "decoder.99.weight" in msg

    sd = synthetic_file_tensors()
    sd["decoder.1.weight"] = torch.zeros(SMALL[0], 48, 3, 3)  # a Wan 2.2 (48-channel) decoder
    save_file(sd, str(tmp_path / "w22.safetensors"))
    with pytest.raises(CheckpointError, match="48 latent channels"):
        load_taehv(tmp_path / "w22.safetensors")

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    torch.save({"decoder.1.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_taehv(tmp_path / "evil.pth")
    assert not marker.exists()


def _tiny(dtype=torch.float32) -> TAEHV:
    model = TAEHV(TAEHVConfig(widths=SMALL))
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 25
            p.copy_(torch.randn_like(p) * (0.9 / fan_in**0.5))  # keeps activations O(1)
    return model.to(dtype).eval().requires_grad_(False)


def per_frame_reference(model: TAEHV, z: torch.Tensor) -> torch.Tensor:
    """Decode one latent at a time, depth first: each frame made by a TGrow runs through all later
    layers before its successor, and every MemBlock's "past" is its previous input (zeros at first)."""
    layers = list(model.decoder)
    memory: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def run(x, start):
        for i in range(start, len(layers)):
            layer = layers[i]
            if isinstance(layer, MemBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                y = F.conv2d(x, layer.conv.weight)
                c = x.shape[1]
                for j in range(layer.stride):
                    run(y[:, j * c : (j + 1) * c], i + 1)
                return
            else:
                x = layer(x)
        out.append(x)

    for t in range(z.shape[1]):
        run(z[:, t], 0)
    return torch.stack(out, dim=1)


def test_parallel_decode_matches_per_frame_reference_fp64():
    model = _tiny(torch.float64)
    z = torch.randn(2, 4, 16, 3, 5, dtype=torch.float64)
    expected = per_frame_reference(model, z)
    assert expected.shape == (2, 16, 3, 24, 40)
    torch.testing.assert_close(model.decode_step(z, None), expected, rtol=0, atol=1e-10)
    video = model.decode_video(z)
    assert video.shape == (2, 13, 3, 24, 40)  # 1 + 4 * 3 frames after trimming 3
    torch.testing.assert_close(video, expected[:, 3:].clamp(0, 1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("split", [[3, 3, 1], [1, 1, 1, 1, 1, 1, 1], [2, 5], [7]])
def test_stream_equals_parallel_decode(split):
    model = _tiny()
    t = sum(split)
    z = torch.randn(1, t, 16, 4, 6)
    whole_raw = model.decode_step(z, None)
    whole = model.decode_video(z)
    assert whole.gt(0).float().mean() > 0.2 and whole.lt(1).float().mean() > 0.2

    memory: dict[int, torch.Tensor] = {}
    decoder = TAEHVStreamDecoder(model)
    raw_pieces, pieces, start = [], [], 0
    for n in split:
        raw_pieces.append(model.decode_step(z[:, start : start + n], memory))
        frames = decoder.decode_chunk(z[:, start : start + n])
        assert frames.shape == (1, 1 + 4 * (n - 1) if start == 0 else 4 * n, 3, 32, 48)
        assert frames.dtype == torch.float32 and frames.is_contiguous()
        pieces.append(frames)
        start += n
    assert (torch.cat(raw_pieces, dim=1) - whole_raw).abs().max() <= 1e-5
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape[1] == 1 + 4 * (t - 1) == decoder.frames_decoded
    assert (streamed - whole).abs().max() <= 1e-5


def test_stream_reset_and_shape_checks():
    model = _tiny()
    z = torch.randn(1, 4, 16, 4, 6)
    decoder = TAEHVStreamDecoder(model)
    decoder.decode_chunk(torch.randn(1, 2, 16, 4, 6))
    with pytest.raises(ValueError, match="reset"):
        decoder.decode_chunk(torch.randn(2, 1, 16, 4, 6))
    decoder.reset()
    streamed = torch.cat([decoder.decode_chunk(z[:, :3]), decoder.decode_chunk(z[:, 3:])], dim=1)
    assert (streamed - model.decode_video(z)).abs().max() <= 1e-5
