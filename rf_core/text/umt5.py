"""umT5-XXL text encoder (encoder half only), with the parameter names of Wan's
``models_t5_umt5-xxl-enc-bf16.pth`` so that file loads without renaming.

Computation follows the T5 v1.1 / umT5 conventions Wan relies on: pre-norm residual blocks with an
RMSNorm computed in float32, attention logits that are *not* scaled by 1/sqrt(head_dim), a
relative-position bias table per layer (umT5 does not share it), gated-GELU(tanh) feed-forward and a
final RMSNorm. Rows after the sequence (EOS included in the sequence) are returned as exact zeros, as
the DiT's cross-attention expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class UMT5Config:
    """Shape of a umT5 encoder. Defaults are umT5-XXL as shipped with Wan2.1."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets % 4:
            raise ValueError(f"num_buckets {self.num_buckets} must be a multiple of 4 (two directions)")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


UMT5_XXL = UMT5Config()
# Small enough for CPU tests; keeps 32 buckets so the bucket table is the real one.
UMT5_TINY = UMT5Config(vocab_size=96, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2)


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int = 32, max_distance: int = 128, device=None
) -> torch.Tensor:
    """Bidirectional T5 bucket index for each (query, key) pair, shape [query_len, key_len].

    rel = key - query. Half of the buckets serve rel <= 0, the other half (offset by num_buckets/2)
    rel > 0. Within a half, |rel| below half of it gets its own bucket; larger distances share
    logarithmically wider buckets up to max_distance, beyond which all share the last bucket.
    The logarithm is taken in float32 exactly as the released models were trained with.
    """
    rel = torch.arange(key_len, device=device)[None, :] - torch.arange(query_len, device=device)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    direction = (rel > 0).long() * half
    dist = rel.abs()
    log_ratio = torch.log(dist.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return direction + torch.where(dist < max_exact, dist, far)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Pull float16 infinities back into range (the residual stream of T5 overflows fp16)."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        bound = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-bound, bound)
    return x


class T5RMSNorm(nn.Module):
    """Scale-only RMSNorm without mean subtraction; statistics in at least float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_fp32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.weight.dtype)


class T5Attention(nn.Module):
    """Multi-head self-attention with unscaled logits and an additive bias."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, -1)
        k = self.k(x).view(b, n, self.num_heads, -1)
        v = self.v(x).view(b, n, self.num_heads, -1)
        logits = torch.einsum("bqhc,bkhc->bhqk", q, k) + bias
        weights = F.softmax(_at_least_fp32(logits), dim=-1).to(v.dtype)
        out = torch.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, -1)
        return self.o(out)


class T5GatedFFN(nn.Module):
    """fc2(fc1(x) * GELU_tanh(gate(x))); ``gate`` is a Sequential so its key is ``gate.0``."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * F.gelu(self.gate(x), approximate="tanh"))


class T5RelativeBias(nn.Module):
    """Per-layer table of one bias per (bucket, head); key ``pos_embedding.embedding.weight``."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, heads, Lq, Lk]


class UMT5Block(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5GatedFFN(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        # Padded keys get the most negative finite value instead of (not on top of) the position bias.
        bias = self.pos_embedding(buckets).to(x.dtype).masked_fill(key_padding, torch.finfo(x.dtype).min)
        x = fp16_clamp(x + self.attn(self.norm1(x), bias))
        return fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder: ``forward(ids [B, L], mask [B, L]) -> [B, L, dim]``, zeros after the sequence."""

    def __init__(self, cfg: UMT5Config = UMT5_XXL) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(UMT5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"ids and mask must both be [B, L]; got ids {list(ids.shape)}, mask {list(mask.shape)}"
            )
        cfg = self.config
        length = ids.shape[1]
        buckets = relative_position_buckets(
            length, length, cfg.num_buckets, cfg.max_distance, device=ids.device
        )
        key_padding = (mask == 0)[:, None, None, :]  # [B, 1, 1, Lk]
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, key_padding)
        x = self.norm(x)
        # Rows at positions >= seq_len (count of mask ones, EOS included) are exactly zero.
        seq_len = (mask != 0).sum(dim=1, keepdim=True)
        keep = torch.arange(length, device=ids.device)[None, :] < seq_len
        return torch.where(keep[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
