"""Wan 2.1 VAE encoder: checkpoint key layout, Wan's chunked encoding schedule (first frame alone, then
4 frames per latent) written independently, frames-in-[0, 1] entry point for prefill, and loading."""

import pytest
import torch
import torch.nn.functional as F
from _vae_helpers import MEAN, STD, CausalReference, rms, silu, tiny_vae
from safetensors.torch import save_file

from rf_core.vae.wan_layers import Downsample, ResidualBlock
from rf_core.vae.wan_vae import WanVAE, encodable_frames, load_wan_vae

pytestmark = pytest.mark.usefixtures("one_thread")


def wan21_encoder_shapes(dim: int = 96, z: int = 16) -> dict[str, tuple[int, ...]]:
    """Encoder keys and shapes of Wan2.1_VAE.pth, written out from the architecture
    (reference-algorithm.md §7.1: dim_mult 1, 2, 4, 4, two residual blocks per stage, temporal
    downsampling in the second and third resampling, the middle, the head, then ``conv1``)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def residual(prefix: str, cin: int, cout: int) -> None:
        shapes[f"{prefix}.residual.0.gamma"] = (cin, 1, 1, 1)
        shapes[f"{prefix}.residual.2.weight"] = (cout, cin, 3, 3, 3)
        shapes[f"{prefix}.residual.2.bias"] = (cout,)
        shapes[f"{prefix}.residual.3.gamma"] = (cout, 1, 1, 1)
        shapes[f"{prefix}.residual.6.weight"] = (cout, cout, 3, 3, 3)
        shapes[f"{prefix}.residual.6.bias"] = (cout,)
        if cin != cout:
            shapes[f"{prefix}.shortcut.weight"] = (cout, cin, 1, 1, 1)
            shapes[f"{prefix}.shortcut.bias"] = (cout,)

    def downsample(prefix: str, c: int, temporal: bool) -> None:
        shapes[f"{prefix}.resample.1.weight"] = (c, c, 3, 3)
        shapes[f"{prefix}.resample.1.bias"] = (c,)
        if temporal:
            shapes[f"{prefix}.time_conv.weight"] = (c, c, 3, 1, 1)
            shapes[f"{prefix}.time_conv.bias"] = (c,)

    d1, d2, d4 = dim, 2 * dim, 4 * dim
    shapes["encoder.conv1.weight"] = (d1, 3, 3, 3, 3)
    shapes["encoder.conv1.bias"] = (d1,)
    layout = [
        ("res", d1, d1), ("res", d1, d1), ("down", d1, False),
        ("res", d1, d2), ("res", d2, d2), ("down", d2, True),
        ("res", d2, d4), ("res", d4, d4), ("down", d4, True),
        ("res", d4, d4), ("res", d4, d4),
    ]  # fmt: skip
    for i, (kind, a, b) in enumerate(layout):
        (residual if kind == "res" else downsample)(f"encoder.downsamples.{i}", a, b)
    residual("encoder.middle.0", d4, d4)
    shapes["encoder.middle.1.norm.gamma"] = (d4, 1, 1)
    shapes["encoder.middle.1.to_qkv.weight"] = (3 * d4, d4, 1, 1)
    shapes["encoder.middle.1.to_qkv.bias"] = (3 * d4,)
    shapes["encoder.middle.1.proj.weight"] = (d4, d4, 1, 1)
    shapes["encoder.middle.1.proj.bias"] = (d4,)
    residual("encoder.middle.2", d4, d4)
    shapes["encoder.head.0.gamma"] = (d4, 1, 1, 1)
    shapes["encoder.head.2.weight"] = (2 * z, d4, 3, 3, 3)
    shapes["encoder.head.2.bias"] = (2 * z,)
    shapes["conv1.weight"] = (2 * z, 2 * z, 1, 1, 1)
    shapes["conv1.bias"] = (2 * z,)
    return shapes


def test_full_size_encoder_keys_are_wan21s():
    with torch.device("meta"):
        sd = WanVAE().state_dict()
    ours = {k: tuple(t.shape) for k, t in sd.items() if k.startswith(("encoder.", "conv1."))}
    expected = wan21_encoder_shapes()
    assert ours == expected
    # the whole file: 194 tensors, 126,892,531 parameters, of which the decoder and conv2 hold
    # 108 and 73,295,603 (§7.1); the rest is the encoder and conv1
    assert len(expected) == 194 - 108
    assert sum(torch.Size(s).numel() for s in expected.values()) == 126_892_531 - 73_295_603


class ChunkedEncodeReference(CausalReference):
    """Wan's encode: the encoder is called on frame 0 alone, then on frames 1-4, 5-8, ..., one history
    slot per temporal conv. Spatial downsampling pads right and bottom by one and convolves with
    stride 2; a temporal downsampler keeps the first frame of the stream unchanged (remembering it),
    and later convolves [its remembered last frame, the new frames] with kernel 3, stride 2."""

    def downsample(self, block, x):
        conv = block.resample[1]
        frames = [
            F.conv2d(F.pad(x[:, :, f], (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
            for f in range(x.shape[2])
        ]
        x = torch.stack(frames, dim=2)
        if block.time_conv is None:
            return x
        i = self.next_slot()
        past, self.slots[i] = self.slots[i], x[:, :, -1:].clone()
        if past is None:
            return x
        tc = block.time_conv
        return F.conv3d(torch.cat([past, x], dim=2), tc.weight, tc.bias, stride=(2, 1, 1))

    def encode(self, video):
        enc = self.vae.encoder
        calls = [video[:, :, :1]] + [video[:, :, i : i + 4] for i in range(1, video.shape[2], 4)]
        out = []
        for x in calls:
            self.idx = -1
            h = self.conv(enc.conv1, x)
            for block in enc.downsamples:
                h = self.residual(block, h) if isinstance(block, ResidualBlock) else self.downsample(block, h)
            h = self.residual(enc.middle[0], h)
            h = self.attention(enc.middle[1], h)
            h = self.residual(enc.middle[2], h)
            norm, _, conv = enc.head
            out.append(self.conv(conv, silu(rms(norm, h))))
        mu = self.conv(self.vae.conv1, torch.cat(out, dim=2))[:, :16]
        mean = torch.tensor(MEAN, dtype=mu.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(STD, dtype=mu.dtype).view(1, -1, 1, 1, 1)
        return (mu - mean) / std


def test_encode_matches_wans_chunked_schedule_fp64():
    vae = tiny_vae(torch.float64, seed=11)
    assert (
        isinstance(vae.encoder.downsamples[5], Downsample)
        and vae.encoder.downsamples[5].time_conv is not None
    )
    video = torch.rand(2, 3, 13, 24, 40, dtype=torch.float64) * 2 - 1
    expected = ChunkedEncodeReference(vae).encode(video)
    assert expected.shape == (2, 16, 4, 3, 5)  # 1 + 3 latents
    for step in (None, 1, 2, 3):
        got = vae.encode(video, latents_per_step=step)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # causal: every prefix of 1 + 4j frames gives the first 1 + j latents
    for j in range(3):
        torch.testing.assert_close(
            vae.encode(video[:, :, : 1 + 4 * j]), expected[:, :, : 1 + j], rtol=0, atol=1e-10
        )


def test_encode_frames_takes_stream_frames_and_gives_prefill_latents():
    vae = tiny_vae(seed=12)
    frames = torch.rand(1, 9, 3, 16, 24)  # [B, F, 3, H, W] in [0, 1], as the stream decoders give
    z = vae.encode_frames(frames)
    assert z.shape == (1, 3, 16, 2, 3) and z.dtype == torch.float32 and z.is_contiguous()
    expected = vae.encode(frames.permute(0, 2, 1, 3, 4) * 2 - 1).permute(0, 2, 1, 3, 4)
    assert torch.equal(z, expected)
    # a start image is one frame and one latent: the first latent of any video that opens with it
    image = vae.encode_frames(frames[:, :1])
    assert image.shape == (1, 1, 16, 2, 3)
    assert (image - z[:, :1]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"encode_frames: expected frames \[B, F, 3, H, W\]"):
        vae.encode_frames(frames.permute(0, 2, 1, 3, 4))
    with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
        vae.encode_frames(frames[:, :8])


@pytest.mark.parametrize(
    "frames, usable", [(0, 0), (1, 1), (4, 1), (5, 5), (8, 5), (9, 9), (81, 81), (84, 81)]
)
def test_encodable_frames(frames, usable):
    assert encodable_frames(frames) == usable


def test_load_encoder_from_a_file_with_the_real_key_names(tmp_path):
    g = torch.Generator().manual_seed(13)
    file = {k: 0.2 * torch.randn(s, generator=g) for k, s in wan21_encoder_shapes(dim=8).items()}
    decoder = {
        k: v for k, v in tiny_vae(seed=14).state_dict().items() if k.startswith(("decoder.", "conv2."))
    }
    save_file({**file, **decoder}, tmp_path / "wan_2.1_vae.safetensors")
    vae = load_wan_vae(tmp_path / "wan_2.1_vae.safetensors")
    assert vae.config.dim == 8
    loaded = vae.state_dict()
    for key, tensor in file.items():
        assert torch.equal(loaded[key], tensor), key
    z = vae.encode_frames(torch.rand(1, 5, 3, 16, 16))
    assert z.shape == (1, 2, 16, 2, 2) and torch.isfinite(z).all()
