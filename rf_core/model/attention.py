"""Attention backends. All take q [B, Lq, H, D], k/v [B, Lk, H, D] and return [B, Lq, H, D].

"auto" picks FlashAttention-3 (Hopper) or -2 when importable and the tensors are on CUDA, else
PyTorch SDPA (cuDNN kernel preferred on CUDA: at the chunk shapes it measured ~1.8x the flash SDPA
kernel on an H100, see performance notes). Every backend preserves the input dtype.

"sage" (the turbo profile, opt-in: it changes the output) is SageAttention's quantised kernel from the
``sageattention`` package (INT8 Q and K with K smoothed per block, half-precision P and V): CUDA only, no
mask. Its error against exact attention is what rf_core/profiles.py bounds and benchmarks measure.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "cudnn", "flash2", "flash3", "math", "sage")
SAGE_PACKAGE = "sageattention"


@cache
def _flash_fn(version: int):
    name = "flash_attn_interface" if version == 3 else "flash_attn"
    try:
        mod = importlib.import_module(name)
    except Exception:
        return None
    return getattr(mod, "flash_attn_func", None)


@cache
def _sage_fn():
    try:
        mod = importlib.import_module(SAGE_PACKAGE)
    except Exception:
        return None
    return getattr(mod, "sageattn", None)


def available_backends() -> list[str]:
    out = ["sdpa", "math"]
    if torch.cuda.is_available():
        out.append("cudnn")
        out += [f"flash{v}" for v in (2, 3) if _flash_fn(v) is not None]
        out += ["sage"] if _sage_fn() is not None else []
    return out


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    if name in ("flash2", "flash3") and _flash_fn(int(name[-1])) is None:
        pkg = "flash_attn_interface (FlashAttention-3)" if name == "flash3" else "flash_attn"
        raise ValueError(f"attention backend {name!r} needs the {pkg} package, which is not importable")
    if name == "sage" and _sage_fn() is None:
        raise ValueError(
            f"attention backend 'sage' needs the {SAGE_PACKAGE} package (pip install {SAGE_PACKAGE}), "
            "which is not importable"
        )
    return name


def _resolve(name: str, q: torch.Tensor, has_mask: bool) -> str:
    if name != "auto":
        return name
    if not q.is_cuda:
        return "sdpa"
    if not has_mask:
        if torch.cuda.get_device_capability(q.device)[0] == 9 and _flash_fn(3) is not None:
            return "flash3"
        if _flash_fn(2) is not None:
            return "flash2"
    return "cudnn"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D). ``mask``: bool [Lq, Lk] (True = attend) or None."""
    kind = _resolve(backend, q, mask is not None)
    if kind in ("flash2", "flash3", "sage"):
        if mask is not None:
            raise ValueError(f"attention backend {kind} does not take a mask; use 'sdpa'")
        if kind == "sage" and not q.is_cuda:
            raise ValueError("attention backend 'sage' runs on CUDA tensors only; use 'sdpa' on the CPU")
        dtype = q.dtype
        half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        if kind == "sage":  # [B, L, H, D] is its "NHD" layout; scale 1/sqrt(D) is its default
            return _sage_fn()(q.to(half), k.to(half), v.to(half), tensor_layout="NHD").to(dtype)
        out = _flash_fn(int(kind[-1]))(q.to(half), k.to(half), v.to(half))
        out = out[0] if isinstance(out, tuple) else out
        return out.to(dtype)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kind == "sdpa" or not q.is_cuda:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = {
            "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
            "math": [SDPBackend.MATH],
        }[kind]
        if mask is not None and kind == "cudnn":
            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)
