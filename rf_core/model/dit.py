"""Wan2.1 DiT shared by the causal student (KV-cached chunks) and the bidirectional teacher/critic.

Parameter names are Wan2.1's original state-dict keys, so real checkpoints load by prefix handling
only. The maths follows the reference order and dtypes (reference-algorithm.md §1.3): norms in
float32 then cast back, modulation and gating in the model dtype, RoPE in float64 by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rf_core.config import DiTConfig
from rf_core.model.attention import attention, check_backend
from rf_core.model.fp8 import saturate
from rf_core.model.rope import RopeTables, apply_rope

CrossKV = Sequence[tuple[torch.Tensor, torch.Tensor]]


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[N] timesteps -> [N, dim] float64, cosine half first (Wan convention)."""
    half = dim // 2
    pos = t.to(torch.float64)
    freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    ang = torch.outer(pos, freq)
    return torch.cat([ang.cos(), ang.sin()], dim=1)


class RMSNorm(nn.Module):
    """RMS norm over the full width, computed in float32 and cast back before the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm returning the input dtype (affine only for ``norm3``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class Projections(nn.Module):
    """q/k/v/o projections with RMS norms on q and k, as in both of Wan's attention layers."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1)


class SelfAttention(Projections):
    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.norm_q(self.q(x))), self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))


class CrossAttention(Projections):
    def context_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.norm_k(self.k(ctx))), self.heads(self.v(ctx))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], backend: str) -> torch.Tensor:
        q = self.heads(self.norm_q(self.q(x)))
        return self.o(attention(q, kv[0], kv[1], backend).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.gelu_epilogue = False  # see feed_forward; switched on by rf_core.speed.make_fast

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        up, gelu, down = self.ffn
        if self.gelu_epilogue and h.is_cuda and type(up) is nn.Linear and not torch.is_grad_enabled():
            # cuBLASLt applies the tanh GELU to the float32 accumulator in the GEMM's epilogue: one
            # read and write of the 4680 x 8960 hidden activation fewer (its CPU kernel uses erf GELU)
            y = torch._addmm_activation(up.bias, h.flatten(0, -2), up.weight.t(), use_gelu=True)
            return down(y.unflatten(0, h.shape[:-1]))
        return down(gelu(up(h)))

    def pre_attention(
        self, x: torch.Tensor, e0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Modulation, norm and q/k/v of the self-attention. Returns (q roped, k raw, k roped with
        the query positions, v). Pure tensor code: this is what ``compile_blocks`` compiles."""
        return self._qkv(x, e0, cos, sin)

    def _qkv(
        self, x: torch.Tensor, e0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        frames = e0.shape[1]
        m = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)
        h = (self.norm1(x).unflatten(1, (frames, -1)) * (1 + m[1]) + m[0]).flatten(1, 2)
        q, k, v = self.self_attn.qkv(h)
        return apply_rope(q, cos, sin).type_as(v), k, apply_rope(k, cos, sin).type_as(v), v

    def pre_attention_into(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_out: torch.Tensor,
        v_out: torch.Tensor,
    ) -> torch.Tensor:
        """``pre_attention`` writing the roped keys and the values into the cache slot views; returns
        the roped queries. Compiled, the writes are stores of the kernels that compute k and v."""
        q, _, k, v = self._qkv(x, e0, cos, sin)
        k_out.copy_(saturate(k, k_out.dtype))  # a float8 cache (low-vram profile) saturates
        v_out.copy_(saturate(v, v_out.dtype))
        return q

    def post_attention(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        e0: torch.Tensor,
        ck: torch.Tensor,
        cv: torch.Tensor,
        backend: str,
    ) -> torch.Tensor:
        """Output projection and gate, cross-attention, FFN."""
        frames = e0.shape[1]
        m = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)
        y = self.self_attn.o(y.flatten(2))
        x = x + (y.unflatten(1, (frames, -1)) * m[2]).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x), (ck, cv), backend)
        y = self.feed_forward((self.norm2(x).unflatten(1, (frames, -1)) * (1 + m[4]) + m[3]).flatten(1, 2))
        return x + (y.unflatten(1, (frames, -1)) * m[5]).flatten(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        plan: AttentionPlan,
        layer: int,
        kv_only: bool = False,
    ) -> torch.Tensor:
        """x [B, f*F, dim]; e0 [B, f, 6, dim] per-frame modulation. ``kv_only``: this pass only
        refreshes the cache, so stop after the self-attention keys/values are written."""
        eager = plan.eager and hasattr(self, "eager_parts")
        pre, pre_into, post = (
            self.eager_parts if eager else (self.pre_attention, self.pre_attention_into, self.post_attention)
        )
        slot = plan.slot_views(layer)
        if slot is None:
            q, k, k_roped, v = pre(x, e0, *plan.rope_q)
            keys, values = plan.keys_values(layer, k, k_roped, v)
        else:
            q = pre_into(x, e0, *plan.rope_q, *slot)
            keys, values = plan.window(layer)
        if kv_only:
            return x
        y = attention(q, keys, values, plan.backend, plan.mask)
        return post(x, y, e0, cross_kv[0], cross_kv[1], plan.cross_backend)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, f*F, dim]; e [B, f, dim] time embedding (before the projection)."""
        frames = e.shape[1]
        m = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(1, (frames, -1)) * (1 + m[1]) + m[0]).flatten(1, 2)


class AttentionPlan:
    """Where a forward's self-attention keys come from, and the RoPE tables of its queries.

    The base plan is bidirectional attention over the tokens of the call (teacher/critic, or a
    masked full-sequence forward), so its keys are roped like its queries;
    ``rf_core.model.kv_cache.CachePlan`` adds the streaming cache.
    """

    def __init__(self, backend: str, rope_q, mask: torch.Tensor | None = None) -> None:
        self.backend = backend
        self.cross_backend = backend  # run_blocks switches it to plain SDPA inside compiled graphs
        self.eager = False  # run compiled models eagerly for this pass (a shape seen once)
        self.rope_q = rope_q
        self.mask = mask

    def keys_values(
        self, layer: int, k: torch.Tensor, k_roped: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Roped keys and values to attend over, given the call's raw and roped keys."""
        return k_roped, v

    def slot_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Buffers the block writes its roped keys and values into (then ``window`` gives the keys
        and values to attend over); None: the block hands them to ``keys_values`` instead."""
        return None

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class WanDiT(nn.Module):
    """Wan2.1 text-to-video DiT. Outputs a flow (velocity) prediction v = noise - x0."""

    def __init__(self, cfg: DiTConfig, attn_backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend = check_backend(attn_backend)
        self.gradient_checkpointing = False
        self.compiled = False
        # stream defaults, switched by rf_core.speed.make_fast (see SinkKVCache / StreamSession)
        self.key_storage = "raw"
        self.cuda_graphs = False
        self.kv_dtype: torch.dtype | None = None  # KV cache storage (None: the model's); rf_core.profiles
        # rf_core.model.offload.BlockOffload when the blocks' weights live on the host (low-vram profile)
        self.offload = None
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RopeTables(cfg.head_dim)

    # ----------------------------------------------------------------- pieces shared by both modes
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def walk_blocks(self) -> Iterator[WanBlock]:
        """The blocks in order, each with its weights on the compute device while it is being used
        (with block offload they are copied there one by one, see rf_core/model/offload.py)."""
        return iter(self.blocks) if self.offload is None else self.offload.walk()

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile the pure-tensor parts of every block (attention and cache writes stay eager,
        so one compiled graph serves all blocks and all cache positions)."""
        kwargs.setdefault("dynamic", False)
        self.compiled = True
        for blk in self.blocks:
            # the uncompiled parts, for one-off shapes (re-cache)
            blk.eager_parts = (blk.pre_attention, blk.pre_attention_into, blk.post_attention)
            blk.pre_attention = torch.compile(blk.pre_attention, **kwargs)
            blk.pre_attention_into = torch.compile(blk.pre_attention_into, **kwargs)
            blk.post_attention = torch.compile(blk.post_attention, **kwargs)

    def set_rope_precision(self, dtype: torch.dtype) -> None:
        """float64 reproduces the reference exactly; float32 is the fast path for bf16 models."""
        self.rope = RopeTables(self.cfg.head_dim, dtype)

    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Token grid (frames, rows, cols) of a latent [B, C, f, h, w], with clear errors."""
        if x.ndim != 5 or x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"latent must be [B, {self.cfg.in_dim}, frames, h, w], got {list(x.shape)}")
        pt, ph, pw = self.cfg.patch_size
        f, h, w = x.shape[2:]
        if f == 0 or f % pt or h % ph or w % pw:
            raise ValueError(
                f"latent frames/height/width {f}x{h}x{w} must be non-zero multiples of the patch size "
                f"{self.cfg.patch_size} (pixel sizes must be multiples of 16)"
            )
        return f // pt, h // ph, w // pw

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[B, L <= text_len, text_dim] umT5 embeddings -> [B, text_len, dim]; zero rows are padded
        before the projection, as in Wan (they are attended to, unmasked)."""
        if context.ndim != 3 or context.shape[-1] != self.cfg.text_dim:
            raise ValueError(
                f"prompt embeddings must be [B, tokens, {self.cfg.text_dim}], got {list(context.shape)}"
            )
        n = context.shape[1]
        if n > self.cfg.text_len:
            raise ValueError(
                f"prompt embeddings have {n} tokens; the model takes at most {self.cfg.text_len}"
            )
        if n < self.cfg.text_len:
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - n))
        return self.text_embedding(context.to(self.dtype))

    def cross_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-block cross-attention keys/values of a prompt (computed once per prompt)."""
        ctx = self.embed_text(context)
        return [blk.cross_attn.context_kv(ctx) for blk in self.walk_blocks()]

    def time_embed(self, t: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [B, f] -> e [B, f, dim], e0 [B, f, 6, dim]. A [B] timestep is embedded once per
        sample and broadcast over frames, as Wan's bidirectional model does (bit-identical to it)."""
        per_sample = t.ndim == 1
        if tuple(t.shape) != ((batch,) if per_sample else (batch, frames)):
            raise ValueError(
                f"timesteps must be [B] or [B, frames] = [{batch}, {frames}], got {list(t.shape)}"
            )
        e = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t.flatten()).to(self.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        if per_sample:
            return e[:, None].expand(batch, frames, -1), e0[:, None].expand(batch, frames, -1, -1)
        return e.unflatten(0, (batch, frames)), e0.unflatten(0, (batch, frames))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, prod(patch)*C] with (p, q, r, c) order, c fastest -> [B, C, f*pt, h*ph, w*pw]."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, c)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        return out.reshape(out.shape[0], c, f * pt, h * ph, w * pw)

    def run_blocks(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        e0: torch.Tensor,
        cross: CrossKV,
        plan: AttentionPlan,
        grid: tuple[int, int, int],
        need_output: bool = True,
    ) -> torch.Tensor | None:
        """Blocks + head. With ``need_output=False`` (cache refresh) the last block stops after
        writing its keys/values and the head is skipped: their results would be discarded."""
        last = len(self.blocks) - 1
        # compiled graphs call plain SDPA for the 512-key cross-attention (no backend context manager)
        plan.cross_backend = "sdpa" if self.compiled and not plan.eager else self.attn_backend
        for i, blk in enumerate(self.walk_blocks()):
            kv_only = not need_output and i == last
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, e0, cross[i], plan, i, kv_only, use_reentrant=False)
            else:
                x = blk(x, e0, cross[i], plan, i, kv_only)
        if not need_output:
            return None
        return self.unpatchify(self.head(x, e), grid)

    # ----------------------------------------------------------------- bidirectional (teacher/critic)
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cross: CrossKV | None = None,
    ) -> torch.Tensor:
        """Full-sequence forward. x [B, C, f, h, w]; t [B] or [B, f]; context [B, L, text_dim].
        Frames sit at RoPE positions 0..f-1. ``attn_mask``: bool [f*F, f*F] (True = attend), e.g. a
        block-causal mask. ``cross``: precomputed ``cross_kv(context)`` to skip the text projection."""
        grid = self.grid(x)
        b = x.shape[0]
        tokens = self.patchify(x)
        e, e0 = self.time_embed(t.to(x.device), b, grid[0])
        plan = AttentionPlan(self.attn_backend, self.rope.get(0, *grid, x.device), attn_mask)
        if cross is None:
            cross = self.cross_kv(context)
        return self.run_blocks(tokens, e, e0, cross, plan, grid)
