"""Wan 2.1 VAE: checkpoint layout, decoding schedule, streaming, encoding and loading."""

import os

import pytest
import torch
import torch.nn.functional as F
from _vae_helpers import MEAN, STD, CausalReference, rms, silu, tiny_vae
from safetensors.torch import save_file

from rf_core.io.safe_load import CheckpointError
from rf_core.vae.stream_decode import WanStreamDecoder
from rf_core.vae.wan_layers import CausalConv3d, ResidualBlock, Upsample
from rf_core.vae.wan_vae import WanVAE, WanVAEConfig, load_wan_vae, wan_vae_from_state_dict

TINY = WanVAEConfig(dim=8)

# ---------------------------------------------------------------- checkpoint layout (full size, meta)


def test_full_size_layout_matches_wan21_checkpoint():
    with torch.device("meta"):
        vae = WanVAE()
    sd = vae.state_dict()
    assert len(sd) == 194
    assert sum(t.numel() for t in sd.values()) == 126_892_531
    dec = {k: t for k, t in sd.items() if k.startswith(("decoder.", "conv2."))}
    assert len(dec) == 108
    assert sum(t.numel() for t in dec.values()) == 73_295_603
    known = {  # reference-algorithm.md §7.1
        "decoder.conv1.weight": [384, 16, 3, 3, 3],
        "decoder.middle.1.to_qkv.weight": [1152, 384, 1, 1],
        "decoder.upsamples.3.time_conv.weight": [768, 384, 3, 1, 1],
        "decoder.upsamples.3.resample.1.weight": [192, 384, 3, 3],
        "decoder.upsamples.4.shortcut.weight": [384, 192, 1, 1, 1],
        "decoder.head.2.weight": [3, 96, 3, 3, 3],
        "conv2.weight": [16, 16, 1, 1, 1],
        "conv1.weight": [32, 32, 1, 1, 1],
        "decoder.middle.0.residual.0.gamma": [384, 1, 1, 1],  # ComfyUI's Wan 2.1 VAE detection key
        "decoder.middle.1.norm.gamma": [384, 1, 1],
        "encoder.conv1.weight": [96, 3, 3, 3, 3],
        "encoder.head.2.weight": [32, 384, 3, 3, 3],
    }
    for key, shape in known.items():
        assert list(sd[key].shape) == shape, key
    assert "decoder.upsamples.0.upsamples.0.residual.2.weight" not in sd  # that one means Wan 2.2
    # 32 decoder convolutions keep temporal history (§7.2): conv1, 4 middle, 24 residual, 2 time_conv, head.
    cached = [m for m in vae.decoder.modules() if isinstance(m, CausalConv3d) and m.context > 0]
    assert len(cached) == 32


def test_full_size_state_dict_loads_on_meta_and_shape_errors_name_the_key():
    with torch.device("meta"):
        sd = WanVAE().state_dict()
    vae = wan_vae_from_state_dict(dict(sd), source="synthetic-full")
    assert vae.config.dim == 96 and vae.decoder.conv1.weight.is_meta
    bad = dict(sd)
    bad["decoder.upsamples.3.time_conv.weight"] = torch.empty(384, 384, 3, 1, 1, device="meta")
    with pytest.raises(CheckpointError) as err:
        wan_vae_from_state_dict(bad, source="synthetic-full")
    msg = str(err.value)
    assert "synthetic-full" in msg and "decoder.upsamples.3.time_conv.weight" in msg
    assert "expected [768, 384, 3, 1, 1], got [384, 384, 3, 1, 1]" in msg


# ---------------------------------------------------------------- decoding schedule


class PerFrameReference(CausalReference):
    """Wan's canonical decode, written independently: one decoder call per latent frame, one
    history slot per temporal conv (visited in order), zero padding in front, the last two input
    frames kept, and the temporal upsamplers skipping their very first frame."""

    def upsample(self, block, x):
        if block.time_conv is not None:
            i = self.next_slot()
            if self.slots[i] is None:
                self.slots[i] = "first frame passed"
            else:
                if isinstance(self.slots[i], str):
                    self.slots[i] = None  # frames after the first start from zero history
                self.idx -= 1
                y = self.conv(block.time_conv, x)
                c = x.shape[1]
                x = torch.stack([y[:, :c], y[:, c:]], dim=3).flatten(2, 3)  # pairs in time order
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        conv = block.resample[1]
        frames = [F.conv2d(x[:, :, f], conv.weight, conv.bias, padding=1) for f in range(x.shape[2])]
        return torch.stack(frames, dim=2)

    def decode(self, z_normalised):
        vae = self.vae
        mean = torch.tensor(MEAN, dtype=z_normalised.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(STD, dtype=z_normalised.dtype).view(1, -1, 1, 1, 1)
        x = self.conv(vae.conv2, z_normalised * std + mean)
        out = []
        for f in range(x.shape[2]):
            self.idx = -1
            h = self.conv(vae.decoder.conv1, x[:, :, f : f + 1])
            h = self.residual(vae.decoder.middle[0], h)
            h = self.attention(vae.decoder.middle[1], h)
            h = self.residual(vae.decoder.middle[2], h)
            for block in vae.decoder.upsamples:
                h = self.residual(block, h) if isinstance(block, ResidualBlock) else self.upsample(block, h)
            norm, _, conv = vae.decoder.head
            out.append(self.conv(conv, silu(rms(norm, h))))
        return torch.cat(out, dim=2)


def test_decode_matches_independent_per_frame_schedule_fp64():
    vae = tiny_vae(torch.float64)
    assert isinstance(vae.decoder.upsamples[3], Upsample)
    z = torch.randn(2, 16, 4, 3, 5, dtype=torch.float64)
    expected = PerFrameReference(vae).decode(z)
    assert expected.shape == (2, 3, 13, 24, 40)  # 1 + 4 * 3 frames
    assert (expected.abs() < 1).double().mean() > 0.9  # the clamp below leaves most values alone
    for step in (None, 1, 3):
        got = vae.decode(z, latents_per_step=step)
        torch.testing.assert_close(got, expected.clamp(-1, 1), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def vae32():
    torch.manual_seed(7)
    return tiny_vae()


@pytest.mark.parametrize("split", [[3, 3, 1], [1, 1, 1, 1, 1, 1, 1], [2, 5], [4, 1, 2], [7]])
def test_stream_equals_whole_decode(vae32, split):
    t = sum(split)
    z = torch.randn(1, t, 16, 4, 6)  # model space, frame-major
    whole = vae32.decode(z.transpose(1, 2), latents_per_step=None) * 0.5 + 0.5  # [B, 3, F, H, W]
    whole = whole.transpose(1, 2)
    assert (whole.gt(0) & whole.lt(1)).float().mean() > 0.95  # not a comparison of clamped values

    decoder = WanStreamDecoder(vae32)
    pieces, start = [], 0
    for n in split:
        frames = decoder.decode_chunk(z[:, start : start + n])
        assert frames.shape == (1, 1 + 4 * (n - 1) if start == 0 else 4 * n, 3, 32, 48)
        assert frames.dtype == torch.float32 and frames.is_contiguous()
        pieces.append(frames)
        start += n
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape[1] == 1 + 4 * (t - 1) == decoder.frames_decoded
    assert (streamed - whole).abs().max() <= 1e-5


def test_stream_with_small_passes_batch_and_reset(vae32):
    z = torch.randn(2, 5, 16, 4, 6)
    whole = (vae32.decode(z.transpose(1, 2), latents_per_step=None) * 0.5 + 0.5).transpose(1, 2)
    decoder = WanStreamDecoder(vae32, latents_per_step=1)
    decoder.decode_chunk(torch.randn(2, 3, 16, 4, 6))  # an unrelated stream first
    decoder.reset()
    streamed = torch.cat([decoder.decode_chunk(z[:, :2]), decoder.decode_chunk(z[:, 2:])], dim=1)
    assert (streamed - whole).abs().max() <= 1e-5


def test_stream_state_stays_bounded(vae32):
    decoder = WanStreamDecoder(vae32)
    sizes = []
    for _ in range(5):
        decoder.decode_chunk(torch.randn(1, 3, 16, 4, 6))
        sizes.append(decoder.cache_elements())
    # Every cached conv holds 2 frames at its own resolution (reference-algorithm.md §7.3, in decode
    # order: 1 x [16], 11 x [4d] at h x w; 1 x [2d], 6 x [4d] at 2h x 2w; 6 x [2d] at 4h x 4w;
    # 7 x [d] at 8h x 8w), whatever the stream length.
    d, hw = vae32.config.dim, 4 * 6
    expected = 2 * hw * (16 + 11 * 4 * d + 4 * (2 * d + 6 * 4 * d) + 16 * 6 * 2 * d + 64 * 7 * d)
    assert sizes == [expected] * 5


def test_stream_rejects_mismatched_chunks(vae32):
    decoder = WanStreamDecoder(vae32)
    decoder.decode_chunk(torch.randn(1, 1, 16, 4, 6))
    with pytest.raises(ValueError, match="reset"):
        decoder.decode_chunk(torch.randn(1, 1, 16, 6, 6))
    with pytest.raises(ValueError, match=r"\[B, n>=1, 16, h, w\]"):
        decoder.decode_chunk(torch.randn(1, 16, 1, 4, 6))


# ---------------------------------------------------------------- encoding


def test_encode_shapes_chunking_and_causality(vae32):
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    z = vae32.encode(video, latents_per_step=None)
    assert z.shape == (1, 16, 3, 4, 6) and z.dtype == torch.float32
    for step in (1, 2):
        assert (vae32.encode(video, latents_per_step=step) - z).abs().max() <= 1e-5
    # Causal: the first 1 + 4 frames alone give the same first two latents.
    assert (vae32.encode(video[:, :, :5]) - z[:, :, :2]).abs().max() <= 1e-5
    raw = vae32.encode(video, normalize=False)
    mean = torch.tensor(MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 8, 32, 48), (1, 3, 5, 30, 48), (1, 4, 5, 32, 48)])
def test_encode_rejects_bad_shapes(vae32, shape):
    with pytest.raises(ValueError, match="encode"):
        vae32.encode(torch.zeros(shape))


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".legacy.pth"])
def test_load_round_trip(tmp_path, vae32, suffix):
    sd = {k: v.contiguous() for k, v in vae32.state_dict().items()}
    path = tmp_path / f"tiny_vae{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=suffix == ".pth")
    loaded = load_wan_vae(path)
    assert loaded.config == TINY
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    z = torch.randn(1, 16, 3, 4, 6)
    assert torch.equal(loaded.decode(z), vae32.decode(z))


def test_load_converts_dtype(tmp_path, vae32):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vae32.state_dict().items()}, str(path))
    loaded = load_wan_vae(path, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.decode(torch.randn(1, 16, 2, 4, 6)).dtype == torch.float32


def _save(tmp_path, sd, name="bad.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_load_missing_and_unexpected_keys_are_listed(tmp_path, vae32):
    sd = dict(vae32.state_dict())
    del sd["decoder.head.0.gamma"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = _save(tmp_path, sd)
    with pytest.raises(CheckpointError) as err:
        load_wan_vae(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): decoder.head.0.gamma" in msg
    assert "unexpected keys (1): decoder.extra.weight" in msg


def test_load_wrong_shape_names_key_expected_and_found(tmp_path, vae32):
    sd = dict(vae32.state_dict())
    sd["decoder.conv1.weight"] = torch.zeros(32, 16, 3, 3, 1)
    path = _save(tmp_path, sd)
    with pytest.raises(
        CheckpointError,
        match=r"decoder\.conv1\.weight: expected \[32, 16, 3, 3, 3\], got \[32, 16, 3, 3, 1\]",
    ):
        load_wan_vae(path)


def test_load_refuses_pickled_code(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"decoder.conv1.weight": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_wan_vae(path)
    assert not marker.exists()


def test_load_reports_unusable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_wan_vae(tmp_path / "absent.pth")
    for name in ("junk.safetensors", "junk.pth"):
        junk = tmp_path / name
        junk.write_bytes(b"\x00not a checkpoint")
        with pytest.raises(CheckpointError, match=name):
            load_wan_vae(junk)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_wan_vae(tmp_path / "list.pth")
    other = _save(tmp_path, {"model.weight": torch.zeros(2)}, "other.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan 2.1 VAE"):
        load_wan_vae(other)
    wan22 = _save(
        tmp_path, {"decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(2)}, "w22.safetensors"
    )
    with pytest.raises(CheckpointError, match="Wan 2.2"):
        load_wan_vae(wan22)
