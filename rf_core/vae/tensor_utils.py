"""Small tensor helpers shared by the decoders."""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 when it already is (reduced-precision outputs are widened)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
