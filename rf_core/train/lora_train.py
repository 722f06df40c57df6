"""Trainable LoRA adapters on the Linear layers of a Wan DiT.

Each targeted ``nn.Linear`` gets two extra parameters, ``lora_down`` [rank, in] and ``lora_up``
[out, rank], and a forward hook adding ``scale · up(down(x))`` with scale = alpha / rank. The module
tree and the base weight names stay as they are, so FSDP wraps the model unchanged, full-weight
export still works, and the adapters are plain parameters for the optimiser, EMA and checkpoints.
``lora_up`` starts at zero: an adapted model starts equal to its base.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# Linear layers of a Wan block, named like the state-dict keys (the common Wan LoRA targets).
DEFAULT_TARGETS: tuple[str, ...] = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)
DOWN, UP = "lora_down", "lora_up"


def matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern with ``*`` is a glob over the full module name; otherwise a dotted suffix
    ("self_attn.q" matches "blocks.3.self_attn.q")."""
    for p in patterns:
        if "*" in p or "?" in p:
            if fnmatch.fnmatchcase(name, p):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def _lora_hook(module: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
    down, up = getattr(module, DOWN), getattr(module, UP)
    x = args[0]
    if not torch.is_autocast_enabled(x.device.type):  # e.g. bf16 base weights with float32 adapters
        x = x.to(down.dtype)
    return out + (module.lora_scale * F.linear(F.linear(x, down), up)).to(out.dtype)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Attach trainable adapters to every ``nn.Linear`` matching ``targets``; returns their module
    names. Only the adapters are left trainable. ``lora_down`` is drawn from a private generator
    (Kaiming-uniform bounds, as PyTorch initialises Linear weights), so runs are reproducible."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches(n, targets)]
    if not names:
        raise ValueError(f"no Linear layer matches the LoRA targets {list(targets)}")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for n in names:
        lin = modules[n]
        if hasattr(lin, DOWN):
            raise ValueError(f"{n} already has a LoRA adapter")
        device = lin.weight.device
        bound = 1 / math.sqrt(lin.in_features)
        down = (torch.rand(rank, lin.in_features, generator=g) * 2 - 1) * bound
        lin.register_parameter(DOWN, nn.Parameter(down.to(device, dtype)))
        lin.register_parameter(
            UP, nn.Parameter(torch.zeros(lin.out_features, rank, device=device, dtype=dtype))
        )
        lin.lora_scale = alpha / rank
        lin.lora_alpha = float(alpha)
        lin._lora_handle = lin.register_forward_hook(_lora_hook)
    return names


def lora_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, DOWN)}
