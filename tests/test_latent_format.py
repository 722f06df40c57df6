"""Wan 2.1 latent statistics and the model-space <-> ComfyUI LATENT conversion."""

import pytest
import torch

from rf_core.vae.latent_format import LATENT_MEAN, LATENT_STD, from_comfy_latent, to_comfy_latent

# Written out again from ComfyUI's `comfy.latent_formats.Wan21` (comfyui-integration.md §2.3).
COMFY_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
COMFY_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


def test_constants_match_comfyui():
    assert list(LATENT_MEAN) == COMFY_MEAN
    assert list(LATENT_STD) == COMFY_STD


def test_to_comfy_matches_process_out_elementwise():
    z = torch.randn(2, 3, 16, 4, 5, dtype=torch.float64)  # model space, frame-major
    out = to_comfy_latent(z)
    assert out.shape == (2, 16, 3, 4, 5)
    assert out.dtype == torch.float32 and out.is_contiguous()
    # Element by element: LATENT[b, c, t] = z[b, t, c] * std[c] + mean[c].
    for b, c, t in [(0, 0, 0), (1, 15, 2), (0, 7, 1), (1, 3, 0)]:
        expected = z[b, t, c] * COMFY_STD[c] + COMFY_MEAN[c]
        torch.testing.assert_close(out[b, c, t].double(), expected, rtol=1e-6, atol=1e-6)


def test_from_comfy_matches_process_in_elementwise():
    latent = torch.randn(1, 16, 4, 3, 3) * 3
    z = from_comfy_latent(latent)
    assert z.shape == (1, 4, 16, 3, 3)
    for c, t in [(0, 0), (5, 3), (15, 1)]:
        expected = (latent[0, c, t] - COMFY_MEAN[c]) / COMFY_STD[c]
        torch.testing.assert_close(z[0, t, c], expected, rtol=1e-6, atol=1e-6)


def test_round_trip_both_ways():
    z = torch.randn(2, 5, 16, 6, 7)
    torch.testing.assert_close(from_comfy_latent(to_comfy_latent(z)), z, rtol=0, atol=1e-5)
    latent = torch.randn(1, 16, 3, 2, 2) * 2
    torch.testing.assert_close(to_comfy_latent(from_comfy_latent(latent)), latent, rtol=0, atol=1e-5)


def test_bf16_input_is_widened_to_float32():
    z = torch.randn(1, 2, 16, 2, 2).bfloat16()
    out = to_comfy_latent(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out[0, :, 0, 0, 0], z[0, 0, :, 0, 0].float() * torch.tensor(COMFY_STD) + torch.tensor(COMFY_MEAN)
    )


@pytest.mark.parametrize(
    "fn, shape",
    [
        (to_comfy_latent, (1, 16, 3, 4, 4)),
        (from_comfy_latent, (1, 3, 16, 4, 4)),
        (to_comfy_latent, (16, 4, 4)),
    ],
)
def test_wrong_layout_is_rejected(fn, shape):
    with pytest.raises(ValueError, match="expected a"):
        fn(torch.zeros(shape))
