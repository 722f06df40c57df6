"""Self-attention KV cache with sink policies, shared by all blocks of one stream.

Layout: one buffer per k and v, [layers, B, capacity_frames * F, H, D], holding keys (after RMSNorm)
and values in frame order: [sink frames | older frames ... | current chunk]. RoPE frame positions are
window-relative (slot index 0..K-1, queries at the end), so streams are unlimited. Two key storages:
- ``raw`` (the reference): keys are stored un-roped and the whole window is roped on every pass;
- ``roped`` (the fast path): keys are stored roped at their slot's position, so a pass ropes only its
  own keys and attends straight over the buffer. When eviction moves frames to other slots, their keys
  are rotated by the frame offset (RoPE rotations compose), and evicted keys are rotated to the sink
  slot's position before the EMA blend (rotations are linear, so blending roped keys = roping the
  blend). Same maths; the extra rotations cost one bf16 rounding each.

A chunk's life: ``begin_chunk`` makes room (evicting the oldest non-sink frames and, for the ``ema``
policy, blending them into the sink), every pass of the chunk writes its keys into the reserved slot
(the denoising passes' noisy keys are overwritten by the clean context pass), ``commit`` makes the
slot part of the window. Only ``begin_chunk`` and ``commit`` change what later chunks see, and
``begin_chunk`` runs once per chunk, so an interrupted chunk can simply be run again.

Storage dtype: the cache may keep keys and values in a smaller dtype than the model computes in
(``storage_dtype``, e.g. float8 e4m3 for the low-vram profile: half the memory). Writes saturate to its
range; every read (the attention window, eviction's blend and rotations) is upcast to the compute dtype
first, so the attention kernels and the arithmetic see the model's dtype. With the default (the compute
dtype) the upcasts are no-ops and nothing changes.

Policies (reference-algorithm.md §2): ``ema`` = Reward Forcing's EMA-Sink; ``static`` = frozen first
frames (Self-Forcing/LongLive); ``none`` = plain sliding window; ``global`` = no eviction up to
``max_frames``. Generalisations of the reference (documented in docs/api.md):
- the sink is the first ``sink_frames`` frames of the stream even when chunks are smaller or larger
  than the sink (the reference only handles chunk == sink);
- evicted frames are blended frame by frame into sink slot ``n mod sink_frames``, n counting evicted
  frames; with chunk == sink this is exactly the reference's blend of the evicted chunk.
"""

from __future__ import annotations

import functools

import torch

from rf_core.config import StreamConfig
from rf_core.model.dit import AttentionPlan
from rf_core.model.fp8 import saturate
from rf_core.model.rope import apply_rope, frame_shift

KEY_STORAGES = ("raw", "roped")


class CacheFullError(RuntimeError):
    pass


class SinkKVCache:
    evict_group_bytes = 32 << 20  # eviction temporaries: one frame of keys of this many bytes of layers

    def __init__(
        self,
        num_layers: int,
        batch: int,
        frame_tokens: int,
        num_heads: int,
        head_dim: int,
        config: StreamConfig,
        device: torch.device | str,
        dtype: torch.dtype,
        key_storage: str = "raw",
        rope_dtype: torch.dtype = torch.float64,
        fused: bool = False,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        """``fused``: rotate moved keys with one compiled kernel per call (for compiled models): the
        float32 intermediates of eager RoPE over every layer's window would cost GiBs and ~15 ms.
        ``storage_dtype``: dtype the keys and values are kept in (default ``dtype``, the compute dtype)."""
        if key_storage not in KEY_STORAGES:
            raise ValueError(f"key_storage must be one of {KEY_STORAGES}, got {key_storage!r}")
        self.config = config
        self.roped = key_storage == "roped"
        self.head_dim = head_dim
        self.rope_dtype = rope_dtype
        self.fused = fused
        self._shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.frame_tokens = frame_tokens
        self.capacity = config.cache_frames
        self.sink = config.effective_sink_frames
        self.alpha = config.ema_alpha
        self.dtype = dtype
        shape = (num_layers, batch, self.capacity * frame_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=storage_dtype or dtype)
        self.v = torch.zeros(shape, device=device, dtype=storage_dtype or dtype)
        self.reset()

    def reset(self) -> None:
        self.frames = 0  # committed frames in the buffer
        self.pending: int | None = None  # frames reserved for the chunk in progress
        self.evicted_total = 0
        # absolute frame index held by each committed slot; None once a sink slot is a blend
        self.frame_ids: list[int | None] = []
        self.next_frame = 0

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.k, self.v))

    def _tok(self, frames: int) -> int:
        return frames * self.frame_tokens

    def load(self, x: torch.Tensor) -> torch.Tensor:
        """Stored keys or values in the compute dtype (a no-op unless the storage is smaller)."""
        return x.to(self.dtype)

    def store(self, dst: torch.Tensor, x: torch.Tensor) -> None:
        """Write computed keys or values into the buffer (saturating into a float8 storage)."""
        dst.copy_(saturate(x, dst.dtype))

    def begin_chunk(self, n: int) -> tuple[int, int]:
        """Reserve a slot for a new chunk of ``n`` frames, evicting as needed. Idempotent while a
        chunk is pending (an interrupted chunk reuses its slot). Returns the slot (start, end) in frames."""
        if self.pending is not None:
            if self.pending != n:
                raise ValueError(f"a chunk of {self.pending} frames is pending; cannot begin one of {n}")
            return self.frames, self.frames + n
        if n > self.capacity - self.sink:
            raise ValueError(
                f"chunk of {n} frames does not fit a window of {self.capacity} with {self.sink} sink frames"
            )
        overflow = self.frames + n - self.capacity
        if overflow > 0:
            if self.config.sink_policy == "global":
                raise CacheFullError(
                    f"the 'global' sink policy holds at most max_frames={self.capacity} latent frames; "
                    f"use 'ema', 'static' or 'none' for longer streams, or raise max_frames"
                )
            self._evict(overflow)
        self.pending = n
        return self.frames, self.frames + n

    def _evict(self, e: int) -> None:
        # In place, a frame and a few layers at a time, so the temporaries stay small (at full size
        # one frame of keys over all layers is ~144 MB). The blend reads the evicted frames first;
        # then each kept frame moves down by e slots, in ascending order, which never overwrites a
        # frame still to be moved. Per element the maths is that of the whole-buffer expressions.
        z, t = self.sink, self.frame_tokens
        keep = self.frames - z - e

        def frame(i: int) -> slice:
            return slice(i * t, (i + 1) * t)

        for layers in self._layer_groups():
            k, v = self.k[layers], self.v[layers]
            if self.config.sink_policy == "ema" and z > 0:
                a = self.alpha
                for j in range(e):
                    slot = (self.evicted_total + j) % z
                    s, src = frame(slot), frame(z + j)
                    # same expression and rounding as the reference: a*sink + (1-a)*evicted
                    evicted = self._moved(self.load(k[:, :, src]), slot - (z + j))
                    self.store(k[:, :, s], a * self.load(k[:, :, s]) + (1 - a) * evicted)
                    self.store(v[:, :, s], a * self.load(v[:, :, s]) + (1 - a) * self.load(v[:, :, src]))
            for i in range(keep):
                dst, src = frame(z + i), frame(z + e + i)
                if self.roped:
                    self.store(k[:, :, dst], self._moved(self.load(k[:, :, src]), -e))
                else:  # raw keys do not change when they move: a plain copy in the storage dtype
                    k[:, :, dst] = k[:, :, src]
                v[:, :, dst] = v[:, :, src]
        if self.config.sink_policy == "ema" and z > 0:
            for j in range(e):
                self.frame_ids[(self.evicted_total + j) % z] = None
        self.evicted_total += e
        del self.frame_ids[z : z + e]
        self.frames -= e

    def _layer_groups(self) -> list[slice]:
        """Slices of layers holding about ``evict_group_bytes`` of one frame's keys each."""
        layers = self.k.shape[0]
        frame_bytes = self.k[0, :, : self.frame_tokens].numel() * self.k.element_size()
        step = max(1, min(layers, self.evict_group_bytes // max(1, frame_bytes)))
        return [slice(i, i + step) for i in range(0, layers, step)]

    def _moved(self, k: torch.Tensor, frames: int) -> torch.Tensor:
        """Keys [layers, B, tokens, H, D] moved by ``frames`` slots: roped keys follow their new
        position (raw keys do not change)."""
        if not self.roped or frames == 0:
            return k
        tables = self._shifts.get(frames)
        if tables is None:  # built once per offset: the host-to-device copy would recur every chunk
            tables = self._shifts[frames] = frame_shift(self.head_dim, frames, k.device, self.rope_dtype)
        cos, sin = tables
        return (_apply_rope_compiled() if self.fused else apply_rope)(k, cos, sin)

    def commit(self) -> None:
        if self.pending is None:
            raise RuntimeError("commit() without begin_chunk()")
        n = self.pending
        self.frame_ids.extend(range(self.next_frame, self.next_frame + n))
        self.next_frame += n
        self.frames += n
        self.pending = None

    def plan(self, slot: tuple[int, int], rope, rows: int, cols: int, backend: str, device) -> CachePlan:
        return CachePlan(self, slot, rope, rows, cols, backend, device)


class CachePlan(AttentionPlan):
    """Self-attention of frames occupying cache slot [start, end): keys are buffer frames [0, end)
    with positions 0..end-1; queries sit at positions start..end-1.

    Without gradients the pass writes its keys into the slot in place and attends over the buffer
    (with ``roped`` storage the block writes them itself, see ``slot_views``). With gradients
    (training exit step) nothing is written: the pass attends over a snapshot of the committed prefix
    concatenated with its own keys, so no gradient reaches other chunks through the buffer and
    gradient checkpointing recomputes the same values."""

    def __init__(self, cache: SinkKVCache, slot, rope, rows: int, cols: int, backend: str, device) -> None:
        start, end = slot
        super().__init__(backend, rope.get(start, end - start, rows, cols, device))
        self.cache = cache
        self.lo = cache._tok(start)
        self.hi = cache._tok(end)
        needs_prefix_rope = start > 0 and not cache.roped
        self.prefix_rope = rope.get(0, start, rows, cols, device) if needs_prefix_rope else None
        self.grad = torch.is_grad_enabled()
        if self.grad:
            layers = range(cache.k.shape[0])
            self.prefix = [
                (cache.load(cache.k[i, :, : self.lo]).clone(), cache.load(cache.v[i, :, : self.lo]).clone())
                for i in layers
            ]

    def _window_keys(self, prefix: torch.Tensor, k_roped: torch.Tensor) -> torch.Tensor:
        """The stored prefix keys (roped at positions 0.. unless already roped), then the pass's own."""
        if self.prefix_rope is not None:
            prefix = apply_rope(prefix, *self.prefix_rope).type_as(prefix)
        return torch.cat([prefix, k_roped.to(prefix.dtype)], 1)

    def slot_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the block should write its roped keys and values itself (fast path), or None."""
        c = self.cache
        if self.grad or not c.roped:
            return None
        return c.k[layer, :, self.lo : self.hi], c.v[layer, :, self.lo : self.hi]

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values to attend over once the slot holds this pass's keys (``slot_views``)."""
        c = self.cache
        return c.load(c.k[layer, :, : self.hi]), c.load(c.v[layer, :, : self.hi])

    def keys_values(
        self, layer: int, k: torch.Tensor, k_roped: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grad:
            pk, pv = self.prefix[layer]
            if self.lo == 0:
                return k_roped, v
            return self._window_keys(pk, k_roped), torch.cat([pv, v.to(pv.dtype)], 1)
        # raw storage (with roped storage the block writes into ``slot_views`` and never gets here)
        c = self.cache
        c.store(c.k[layer, :, self.lo : self.hi], k)
        c.store(c.v[layer, :, self.lo : self.hi], v)
        values = c.load(c.v[layer, :, : self.hi])
        if self.lo == 0:
            return k_roped, values
        return self._window_keys(c.load(c.k[layer, :, : self.lo]), k_roped), values


@functools.cache
def _apply_rope_compiled():
    return torch.compile(apply_rope, dynamic=False)
