"""8-bit weight storage for the DiT's linear layers (the "fp8_e4m3fn" dtype of Load Model).

Like ComfyUI's own fp8_e4m3fn weight dtype: weights are cast to float8 (no scale) and cast back to
the compute dtype on every call, halving weight memory; activations, norms, biases and embeddings
stay in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fp8Linear(nn.Linear):
    """nn.Linear whose weight is stored in float8 and used in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@torch.no_grad()
def store_linears_fp8(model: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn) -> nn.Module:
    """Cast the weights of every nn.Linear inside ``model.blocks`` to ``dtype`` in place."""
    for module in model.blocks.modules():
        if type(module) is nn.Linear:
            module.weight = nn.Parameter(module.weight.to(dtype), requires_grad=False)
            module.__class__ = Fp8Linear
    return model
