"""fp8 for the DiT's linear layers, three ways.

- Storage (``store_linears_fp8``): weights kept as float8 e4m3 and cast back to the compute dtype on
  every call: half the weight memory, bf16 maths on the rounded weights. Without scale (the default)
  it is ComfyUI's ``fp8_e4m3fn`` weight dtype. ``row_scale=True`` (the low-vram profile) stores one
  scale per output row (the row's amax / 448, in the weight's dtype), so small rows keep e4m3's 3
  mantissa bits instead of falling into its subnormals: on N(0, 1/8960) weights (the FFN's down
  projection at full size) 2.6% relative error instead of 5.3%.
- Compute (``use_fp8_linears``, opt-in via ``make_fast(fp8=True)``): fp8 GEMMs on Hopper's tensor cores
  through ``torch._scaled_mm``.
- Compute through torchao (``use_torchao_fp8_linears``, the turbo profile): torchao's float8 weights with
  one scale per row and dynamic per-row activation scales; under torch.compile the activation
  quantisation fuses into the kernel before the GEMM, the per-call cost that left ``use_fp8_linears``
  with no speed (docs/benchmarks.md, run 6).

For ``use_fp8_linears``, weights are stored as float8 e4m3 with one scale per tensor (amax / 448);
activations are quantised per tensor on the fly the same way; the product is accumulated in fp32 and
returned in the input dtype with the bias added. This changes the numbers (e4m3 keeps 3 mantissa bits): it is a speed option whose
output difference is measured (benchmarks/accuracy_check.py), never a default.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` clamped to the finite range of ``dtype`` when that is a float8 type (a cast of a larger
    value may give NaN: e4m3fn has no infinity), else ``x`` itself."""
    if dtype not in FP8_DTYPES:
        return x
    top = torch.finfo(dtype).max
    return x.clamp(-top, top)


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
    """nn.Linear whose weight is stored in float8 (times ``weight_scale`` [out, 1] when it has one)
    and used in the input's dtype."""

    weight_scale: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.weight.to(x.dtype)
        if self.weight_scale is not None:
            weight = weight * self.weight_scale.to(x.dtype)
        return nn.functional.linear(x, weight, bias)


@torch.no_grad()
def store_linears_fp8(model: nn.Module, dtype: torch.dtype = E4M3, row_scale: bool = False) -> nn.Module:
    """Cast the weights of every nn.Linear inside ``model.blocks`` to ``dtype`` in place;
    ``row_scale``: with one scale per output row (see the module notes)."""
    for module in model.blocks.modules():
        if type(module) is nn.Linear:
            w = module.weight
            scale = None
            if row_scale:
                # rounded to the weight's dtype first, so that dequantising undoes exactly this scale
                top = torch.finfo(dtype).max
                scale = (w.abs().amax(1, keepdim=True).float() / top).clamp(min=1e-12).to(w.dtype)
                w = w.float() / scale.float()
            module.weight = nn.Parameter(saturate(w, dtype).to(dtype), requires_grad=False)
            module.register_buffer("weight_scale", scale)
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


TORCHAO_PACKAGE = "torchao"


def torchao_fp8_config():
    """torchao's config for fp8 weights and activations with per-row scales; a ValueError naming the
    package when torchao is not importable."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    except Exception as err:  # not installed, or a version without this API
        raise ValueError(
            f"fp8 GEMMs through torchao need the {TORCHAO_PACKAGE} package (pip install {TORCHAO_PACKAGE}), "
            f"which is not importable: {err}"
        ) from err
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


@torch.no_grad()
def use_torchao_fp8_linears(model: nn.Module) -> None:
    """Quantise every ``nn.Linear`` inside ``model.blocks`` with torchao (in place; CUDA, compute
    capability 8.9 or newer). Apply LoRAs before this."""
    config = torchao_fp8_config()  # first: its error names the package
    from torchao.quantization import quantize_

    quantize_(model.blocks, config, filter_fn=lambda m, _: type(m) is nn.Linear)
