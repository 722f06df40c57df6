"""Flow-matching schedule of the Reward Forcing sampler (reference-algorithm.md §4.1, §5).

Convention: x_t = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0. The table holds 1000
sigmas linspace(1, 0)[:-1] shifted by s*sigma / (1 + (s-1)*sigma), in float32 like the reference; a
timestep maps to the sigma of the nearest table entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class FlowSchedule:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000) -> None:
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        sigmas = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = self.sigmas * num_train_timesteps

    def warp(self, steps: Sequence[float]) -> list[float]:
        """Map nominal steps (e.g. 1000, 750, 500, 250) onto the shifted table: step s selects
        entry N - s (a step of 0 selects timestep 0)."""
        table = torch.cat([self.timesteps, torch.zeros(1)])
        out = []
        for s in steps:
            if float(s) != int(s) or not 0 <= s <= self.num_train_timesteps:
                raise ValueError(f"warped steps must be integers in [0, {self.num_train_timesteps}], got {s}")
            out.append(float(table[self.num_train_timesteps - int(s)]))
        return out

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Nearest-entry sigma for timestep(s) t (float32, same shape as t)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        idx = (self.timesteps[None, :] - t.reshape(-1, 1).cpu()).abs().argmin(dim=1)
        return self.sigmas[idx].reshape(t.shape)

    def sigma_value(self, t: float) -> float:
        """Nearest-entry sigma of one timestep as a Python float (exactly the float32 table value).
        Python scalars keep the sampler free of host-to-device copies, which would sync the GPU."""
        return float(self.sigma(float(t)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        """(1 - sigma) x0 + sigma eps in float32 like the reference, cast to eps's dtype."""
        s = self.sigma_value(t)
        return ((1 - s) * x0.float() + s * eps.float()).to(eps.dtype)

    def x0_from_flow(self, v: torch.Tensor, xt: torch.Tensor, t: float) -> torch.Tensor:
        """x0 = x_t - sigma v, computed in float64 and cast back to v's dtype."""
        return (xt.double() - self.sigma_value(t) * v.double()).to(v.dtype)

    def flow_from_x0(self, x0: torch.Tensor, xt: torch.Tensor, t: float) -> torch.Tensor:
        """v = (x_t - x0) / sigma in float64, cast back to x0's dtype."""
        return ((xt.double() - x0.double()) / self.sigma_value(t)).to(x0.dtype)
