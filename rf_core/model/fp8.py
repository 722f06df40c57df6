"""fp8 for the DiT's linear layers, two ways.

- Storage (``store_linears_fp8``): weights kept as float8 e4m3 without scale and cast back to the
  compute dtype on every call, like ComfyUI's ``fp8_e4m3fn`` weight dtype: half the weight memory,
  bf16 maths on the rounded weights.
- Compute (``use_fp8_linears``, opt-in via ``make_fast(fp8=True)``): fp8 GEMMs on Hopper's tensor cores
  through ``torch._scaled_mm``.

For compute, weights are stored as float8 e4m3 with one scale per tensor (amax / 448); activations are quantised
per tensor on the fly the same way; the product is accumulated in fp32 and returned in the input dtype
with the bias added. This changes the numbers (e4m3 keeps 3 mantissa bits): it is a speed option whose
output difference is measured (benchmarks/accuracy_check.py), never a default.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled e4m3: returns (x / scale as e4m3, scale) with scale = amax / 448."""
    scale = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).to(E4M3), scale


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` computed as an fp8 GEMM."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w, scale = quantize(linear.weight.detach())
        self.register_buffer("weight_fp8", w)  # [out, in], row-major: its .t() is the column-major B
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize(x.reshape(-1, shape[-1]))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch._scaled_mm(
            xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, bias=bias, out_dtype=x.dtype
        )
        return out.reshape(*shape[:-1], self.out_features)


class Fp8StoredLinear(nn.Linear):
    """nn.Linear whose weight is stored in float8 and used in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


@torch.no_grad()
def store_linears_fp8(model: nn.Module, dtype: torch.dtype = E4M3) -> nn.Module:
    """Cast the weights of every nn.Linear inside ``model.blocks`` to ``dtype`` in place."""
    for module in model.blocks.modules():
        if type(module) is nn.Linear:
            module.weight = nn.Parameter(module.weight.to(dtype), requires_grad=False)
            module.__class__ = Fp8StoredLinear
    return model


@torch.no_grad()
def use_fp8_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``model.blocks`` by an ``Fp8Linear`` (in place). Apply LoRAs
    before this: the fp8 weights are a frozen snapshot. Returns the number of layers replaced."""
    n = 0
    for parent in model.blocks.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Fp8Linear(child))
                n += 1
    return n
