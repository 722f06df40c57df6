"""rf_core/prefix.py: frames that open a stream are fitted to its size (resize to cover, centre crop) and
trimmed to 1 + 4k frames from the front, each change with a note."""

import pytest
import torch

from rf_core.prefix import fit_frames, prefix_frames, prefix_latent_frames, trim_frames


def test_same_size_is_kept_as_is_without_a_note():
    x = torch.rand(3, 16, 32, 3)
    out, note = fit_frames(x, 32, 16, "img")
    assert note is None and torch.equal(out, x)
    u8, _ = fit_frames((x * 255).round().to(torch.uint8), 32, 16, "img")
    torch.testing.assert_close(u8, (x * 255).round() / 255)


def test_a_wider_image_is_centre_cropped_without_resizing():
    x = torch.rand(1, 32, 64, 3)
    out, note = fit_frames(x, 32, 32, "start_image")
    assert torch.equal(out, x[:, :, 16:48])  # the middle 32 columns
    assert note == "start_image is 64x32, the video 32x32: centre-cropped to 32x32"


def test_a_larger_image_is_resized_to_cover_then_cropped():
    # 64x32 (w x h) into 16x16: scaled by 1/2 to 32x16, then the middle 16 columns
    left, right = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    x = torch.empty(1, 32, 64, 3)
    x[:, :, :32], x[:, :, 32:] = left, right
    out, note = fit_frames(x, 16, 16, "img")
    assert out.shape == (1, 16, 16, 3)
    assert torch.allclose(out[:, :, :7], left, atol=1e-6) and torch.allclose(out[:, :, 9:], right, atol=1e-6)
    assert note == "img is 64x32, the video 16x16: resized to 32x16 and centre-cropped to 16x16"
    flat, note = fit_frames(torch.full((2, 8, 8, 3), 0.25), 32, 32, "img")  # upscaling: same aspect
    assert (
        torch.allclose(flat, torch.tensor(0.25)) and note == "img is 8x8, the video 32x32: resized to 32x32"
    )


def test_a_video_loses_its_first_frames_to_reach_1_plus_4k():
    x = torch.arange(7.0).view(7, 1, 1, 1).expand(7, 8, 8, 3)
    out, note = trim_frames(x, "extend")
    assert out[:, 0, 0, 0].tolist() == [2, 3, 4, 5, 6]  # the last frame stays: the continuation follows it
    assert (
        note == "extend has 7 frames; the Wan VAE encodes 1 + 4k, so its first 2 frames are left out (5 kept)"
    )
    kept, note = trim_frames(x[:5], "extend")
    assert torch.equal(kept, x[:5]) and note is None
    both, notes = prefix_frames(torch.rand(6, 8, 16, 3), 8, 8, "extend")
    assert both.shape == (5, 8, 8, 3) and len(notes) == 2
    assert [prefix_latent_frames(n) for n in (1, 5, 17)] == [1, 2, 5]


@pytest.mark.parametrize("bad", [torch.rand(8, 8, 3), torch.rand(0, 8, 8, 3), torch.rand(1, 8, 8, 1)])
def test_what_is_not_frames_is_refused(bad):
    with pytest.raises(ValueError, match=r"img: expected frames \[frames, height, width, 3\]"):
        prefix_frames(bad, 8, 8, "img")
