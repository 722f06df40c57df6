"""Re-DMD generator loss and critic (fake score) loss (reference-algorithm.md §9.4, §9.5).

Latents are frame-major ``[B, F, C, h, w]`` in model space. Score models (teacher, critic) are the
bidirectional mode of the Wan DiT: ``model(x [B, C, F, h, w], t [B], context) -> flow v``.

All loss arithmetic runs in float64, as in the reference; the model calls run in their own dtype.
"""

from __future__ import annotations

import torch

from rf_core.schedule import FlowSchedule


def sample_timesteps(
    batch: int,
    generator: torch.Generator,
    shift: float = 5.0,
    min_t: float = 20.0,
    max_t: float = 980.0,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """DMD/critic timesteps [B] (float32): u ~ UniformInt[0, N), t = N·(s·u/N)/(1 + (s−1)·u/N),
    clamped to [min_t, max_t] (reference: shift 5, clamp [20, 980])."""
    n = num_train_timesteps
    u = torch.randint(0, n, (batch,), generator=generator, device=generator.device).double() / n
    t = n * (shift * u) / (1 + (shift - 1) * u)
    return t.clamp(min_t, max_t).float()


def per_sample_sigma(schedule: FlowSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest-table sigma of each sample's timestep, shaped to broadcast over ``like`` [B, ...]."""
    return schedule.sigma(t.cpu()).to(like.device).view(-1, *([1] * (like.ndim - 1)))


def add_noise(schedule: FlowSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(1 − σ) x0 + σ ε`` in float32, cast to ``eps``'s dtype (t: [B])."""
    s = per_sample_sigma(schedule, t, x0)
    return ((1 - s) * x0.float() + s * eps.float()).to(eps.dtype)


def predict_flow(model, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Score model flow prediction for frame-major latents (the model takes channel-major)."""
    v = model(x_t.permute(0, 2, 1, 3, 4), t, context)
    return v.permute(0, 2, 1, 3, 4)


def predict_x0(
    schedule: FlowSchedule, model, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """x0 = x_t − σ(t)·v in float64. The same σ table serves noising and this conversion (the
    reference's teacher/critic use a shift-8 table here, §13.19; one table is the consistent choice)."""
    v = predict_flow(model, x_t, t, context)
    return x_t.double() - per_sample_sigma(schedule, t, x_t).double() * v.double()


def cfg_x0(x_cond: torch.Tensor, x_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Teacher guidance as in the reference: x_c + s·(x_c − x_u) (s = 3 is CFG 4 in the usual convention)."""
    return x_cond + guidance_scale * (x_cond - x_uncond)


def dmd_gradient(x: torch.Tensor, x_fake: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """Normalised DMD gradient g = (x̂_fake − x̂_real) / mean_{F,C,h,w}|x − x̂_real| per sample,
    float64, with NaN/inf mapped to finite numbers (as in the reference)."""
    xd = x.detach().double()
    fake, real = x_fake.double(), x_real.double()
    norm = (xd - real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((fake - real) / norm)


def reward_weights(rewards: torch.Tensor | None, beta: float, batch: int, device) -> torch.Tensor:
    """Per-sample weights exp(β·r) in float64; ones without a reward or with β = 0 (plain DMD)."""
    if rewards is None or beta == 0:
        return torch.ones(batch, dtype=torch.float64, device=device)
    r = rewards.detach().double().to(device).reshape(-1)
    if r.numel() != batch:
        raise ValueError(f"reward returned {r.numel()} values for a batch of {batch}")
    return torch.exp(beta * r)


def redmd_loss(x: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """0.5 · mean_b( w_b · mean((x_b − stopgrad(x_b − g_b))²) ) in float64. Its gradient w.r.t.
    x_b is w_b·g_b / (B·N) with N the elements per sample; the reference (B = 1) is the same."""
    xd = x.double()
    target = (xd - grad).detach()
    per_sample = (xd - target).pow(2).flatten(1).mean(dim=1)
    return 0.5 * (weights * per_sample).mean()


def critic_flow_loss(v_pred: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Critic loss mean((v̂ − (ε − x))²) in float64. The reference forms v̂ = (x_t − x̂0)/σ from
    x̂0 = x_t − σ·v, which is v itself; we use v directly."""
    target = eps.double() - x.detach().double()
    return (v_pred.double() - target).pow(2).mean()
