"""Exponential moving average of the generator's trainable weights (float32 shadow).

shadow ← decay·shadow + (1 − decay)·param after every generator optimiser step, created from the
current weights once the run reaches ``ema_start_step`` (reference: decay 0.99, start 200, CPU shadow).
Under FSDP each rank keeps the shadow of its own shards; ``full_state`` gathers it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(
        self, params: dict[str, nn.Parameter], decay: float, device: torch.device | str | None = None
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.params = params
        self.shadow = {
            n: _local(p).detach().to(device=device or _local(p).device, dtype=torch.float32, copy=True)
            for n, p in params.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            s = self.shadow[n]
            s.lerp_(_local(p).detach().to(s.device, torch.float32), 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Gathered CPU float32 tensors keyed like the parameters (a collective under FSDP)."""
        out = {}
        for n, p in self.params.items():
            s = self.shadow[n]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(
                    s.to(_local(p).device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                ).full_tensor()
            out[n] = s.cpu()
        return out

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for n, p in self.params.items():
            full = state[n].float()
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(_local(p).device), p.device_mesh, p.placements).to_local()
            self.shadow[n].copy_(full)
