"""Block offload: the DiT's blocks live in host memory and are copied to the GPU one at a time, the
next blocks' copies overlapping the current block's compute (the low-vram profile, rf_core/profiles.py).

Memory. Every block has the same tensors, so each block's parameters and buffers are packed into one
flat host buffer per dtype (pinned on CUDA, so copies are asynchronous DMA), and ``slots`` flat device
buffers of the same layout hold the blocks in use or prefetched. The first ``resident`` blocks stay on
the device and are never copied. Device memory for the blocks: (resident + slots) blocks instead of all.

Order. ``WanDiT.walk_blocks`` (used by ``run_blocks`` and ``cross_kv``) iterates ``BlockOffload.walk``,
which yields block i with its tensors pointing into a slot, then points them back into its host buffer.
Outside the loop a block's weights are readable (``state_dict``) but on the host: a stray use on the
GPU fails with a device mismatch instead of silently reading another block's weights. Every pass visits
the blocks in order, so the blocks wanted next are known: while block i runs, the following
``slots - 1`` streamed blocks (cyclically: after the last comes the first streamed block of the next
pass) are copied on a side stream. CUDA events order the two streams: a copy into a slot waits for the
event recorded after the previous block in that slot was queued, and a block's compute waits for its
copy's event. A pass cut short (Ctrl-C, an error in a block) leaves its block in its slot until the
next walk starts, which releases it first (its event then follows the abandoned pass's queued work), and
it breaks the prediction only: a block found in no slot is copied on demand. Walks must not nest.

Compatibility. torch.compile: compiled block functions take the parameters as inputs of unchanged
shape, dtype and device, so pointing them at a slot does not recompile. CUDA graphs: a captured pass
would replay the copies and pointer swaps of capture time, and ``PassGraphs`` drops its graphs whenever
weight addresses change (here at every block), so offload runs without graphs (``rf_core.profiles``
turns them off). Gradients: a checkpointed block would be recomputed outside the loop, so offload is
for inference only.

On CPU the same bookkeeping runs with plain copies between ordinary tensors, so tests can check that
the output is bit-identical to the model without offload.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

ALIGN_BYTES = 256  # each tensor's offset in a flat buffer: aligned for vectorised loads and cuBLAS

Flat = dict[torch.dtype, torch.Tensor]


class _Layout:
    """Where each tensor of a block sits in its flat per-dtype buffers (the same for every block)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.entries: list[tuple[torch.dtype, int, torch.Size]] = []
        self.sizes: dict[torch.dtype, int] = {}
        for t in tensors:
            step = max(1, ALIGN_BYTES // t.element_size())
            start = -(-self.sizes.get(t.dtype, 0) // step) * step
            self.entries.append((t.dtype, start, t.shape))
            self.sizes[t.dtype] = start + t.numel()

    @property
    def nbytes(self) -> int:
        return sum(n * dt.itemsize for dt, n in self.sizes.items())

    def alloc(self, device: torch.device, pin: bool = False) -> Flat:
        return {dt: torch.empty(n, dtype=dt, device=device, pin_memory=pin) for dt, n in self.sizes.items()}

    def views(self, flat: Flat) -> list[torch.Tensor]:
        return [flat[dt][start : start + shape.numel()].view(shape) for dt, start, shape in self.entries]


def _block_tensors(block: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of a block in a fixed order (a tensor used twice counted once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in (*block.parameters(), *block.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


class BlockOffload:
    """Streams the weights of ``blocks`` (identically shaped modules) to ``device``; see the module notes.

    ``resident``: number of leading blocks kept on the device; ``slots``: device buffers for the
    streamed blocks (2 = double buffering: one block runs while the next one is copied).
    """

    def __init__(
        self, blocks: nn.ModuleList, device: torch.device | str, resident: int = 0, slots: int = 2
    ) -> None:
        if resident < 0 or slots < 1:
            raise ValueError(f"block offload needs resident >= 0 and slots >= 1, got {resident} and {slots}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = list(blocks)
        self.resident = min(resident, len(self.blocks))
        self.streamed = list(range(self.resident, len(self.blocks)))
        self.tensors = [_block_tensors(b) for b in self.blocks]
        signature = [[(t.dtype, t.shape) for t in ts] for ts in self.tensors]
        if any(s != signature[0] for s in signature):
            raise ValueError("block offload needs blocks with identical tensor shapes and dtypes")
        if any(type(t) not in (torch.Tensor, nn.Parameter) for ts in self.tensors for t in ts):
            raise ValueError("block offload cannot move tensor subclasses (e.g. torchao's quantised weights)")
        self.layout = _Layout(self.tensors[0])
        self.host_flat: dict[int, Flat] = {}
        self.host_views: dict[int, list[torch.Tensor]] = {}
        with torch.no_grad():
            for i in range(self.resident):
                for t in self.tensors[i]:
                    t.data = t.data.to(self.device)
            for i in self.streamed:
                self.host_flat[i] = self.layout.alloc(torch.device("cpu"), pin=self.cuda)
                self.host_views[i] = self.layout.views(self.host_flat[i])
                for t, v in zip(self.tensors[i], self.host_views[i]):
                    v.copy_(t.data)
                    t.data = v
        n_slots = min(slots, len(self.streamed))
        self.slot_flat = [self.layout.alloc(self.device) for _ in range(n_slots)]
        self.slot_views = [self.layout.views(flat) for flat in self.slot_flat]
        self.slot_block: list[int | None] = [None] * n_slots
        self.copied: list[torch.cuda.Event | None] = [None] * n_slots  # the copy into the slot is done
        self.released: list[torch.cuda.Event | None] = [None] * n_slots  # its last block was queued
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copies = 0  # block copies made (prefetched or on demand), for tests and benchmarks
        self.current: tuple[int, int] | None = None  # (block, slot) being used by the walk

    def __deepcopy__(self, memo):
        # a copy would share nothing valid: its blocks' tensors point into this offload's buffers
        raise TypeError(
            "a model with offloaded blocks cannot be copied: apply LoRAs before the low-vram profile"
        )

    @property
    def device_bytes(self) -> int:
        """Device memory the blocks take: the resident blocks and the slots."""
        return (self.resident + len(self.slot_flat)) * self.layout.nbytes

    def walk(self) -> Iterator[nn.Module]:
        """The blocks in order, each with its tensors on the device while the caller holds it."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "block offload (the low-vram profile) is for inference: run the model under torch.no_grad()"
            )
        self._release()  # a block a walk cut short left in its slot
        for i, block in enumerate(self.blocks):
            if i >= self.resident:
                self.current = (i, self._acquire(i))
            yield block
            self._release()

    def _acquire(self, i: int) -> int:
        """Make block i's tensors point into a slot holding its weights; prefetch the blocks after it."""
        wanted = [self._after(i, k) for k in range(len(self.slot_flat))]
        slot = self._ensure(i, wanted)
        if self.cuda and self.copied[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        for t, v in zip(self.tensors[i], self.slot_views[slot]):
            t.data = v
        for j in wanted[1:]:
            self._ensure(j, wanted)
        return slot

    def _release(self) -> None:
        """Point the current block back at its host buffer; its slot is free once the queued work is done."""
        if self.current is None:
            return
        i, slot = self.current
        self.current = None
        if self.cuda:
            self.released[slot] = torch.cuda.Event()
            self.released[slot].record(torch.cuda.current_stream(self.device))
        for t, v in zip(self.tensors[i], self.host_views[i]):
            t.data = v

    def _after(self, i: int, k: int) -> int:
        """The streamed block k places after streamed block i, wrapping into the next pass."""
        pos = i - self.resident
        return self.streamed[(pos + k) % len(self.streamed)]

    def _ensure(self, i: int, wanted: list[int]) -> int:
        """The slot holding block i, copying it into a slot holding no wanted block if needed."""
        if i in self.slot_block:
            return self.slot_block.index(i)
        slot = next(s for s, b in enumerate(self.slot_block) if b not in wanted)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.released[slot] is not None:
                    self.copy_stream.wait_event(self.released[slot])
                self._copy(i, slot)
                self.copied[slot] = torch.cuda.Event()
                self.copied[slot].record(self.copy_stream)
        else:
            self._copy(i, slot)
        self.slot_block[slot] = i
        self.copies += 1
        return slot

    def _copy(self, i: int, slot: int) -> None:
        for dt, dst in self.slot_flat[slot].items():
            dst.copy_(self.host_flat[i][dt], non_blocking=True)


def offload_blocks(
    model: nn.Module, device: torch.device | str, resident: int = 0, slots: int = 2
) -> BlockOffload:
    """Keep a ``WanDiT``'s blocks on the host, streamed to ``device`` as they run, and move the rest of
    the model (embeddings, head) to ``device``. The model may come from the host or the device; on a
    memory-capped GPU load it on the host, so that it never sits there whole. Returns the offload
    (also ``model.offload``)."""
    if model.offload is not None:
        raise ValueError("the model's blocks are already offloaded")
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    model.offload = BlockOffload(model.blocks, device, resident, slots)
    return model.offload
