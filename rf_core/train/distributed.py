"""Process group set-up and FSDP2 sharding for Re-DMD training.

One code path: launched with ``torchrun`` (WORLD_SIZE > 1) the generator, critic and teacher are
sharded with FSDP2 ``fully_shard`` (NCCL on GPUs, gloo on CPU); a single process trains the plain
modules. Gradients are averaged over ranks by FSDP's reduce-scatter, so N ranks with a per-rank batch
b train exactly like one process with batch N·b (tests/test_train_distributed.py).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

# WanDiT methods StreamSession calls directly instead of forward(); FSDP must unshard the root's
# own parameters (embeddings, head) around them.
_ROOT_METHODS = ("cross_kv", "time_embed", "patchify", "run_blocks")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group (if any) and pick this rank's device: ``cuda:LOCAL_RANK`` when
    CUDA is available, else CPU; ``device`` overrides the choice for single-process runs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return DistInfo(rank, world, local, dev)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DistInfo(0, 1, 0, torch.device(device))


def broadcast_int(value: int, info: DistInfo) -> int:
    """Rank 0's ``value`` on every rank (all ranks must run the same number of FSDP passes)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=info.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def all_mean(value: float, info: DistInfo) -> float:
    """Mean of a scalar over ranks (for logging)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shard_dit(model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2-shard a WanDiT in place: one unit per block, a separate unit for each block's
    cross-attention (its ``context_kv`` is called outside the block's forward), the rest in the
    root unit. Parameters keep their dtype (float32 master weights; compute runs under autocast)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 warns that in-place ops on a returned view would skip its hooks; the DiT and the
    # rollout only combine these outputs out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for blk in model.blocks:
        fully_shard(blk.cross_attn)
        register_fsdp_forward_method(blk.cross_attn, "context_kv")
        fully_shard(blk)
    fully_shard(model)
    for name in _ROOT_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def destroy(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
