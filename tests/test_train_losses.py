"""Re-DMD and critic losses against hand computations (reference-algorithm.md §9.4, §9.5)."""

import math

import pytest
import torch

from rf_core.schedule import FlowSchedule
from rf_core.train.losses import (
    add_noise,
    cfg_x0,
    critic_flow_loss,
    dmd_gradient,
    predict_x0,
    redmd_loss,
    reward_weights,
    sample_timesteps,
)


def _hand_example():
    """Two samples of two latent values each (shape [B=2, F=1, C=1, h=1, w=2])."""
    shape = (2, 1, 1, 1, 2)
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64).view(shape)
    x_cond = torch.tensor([[0.5, 1.5], [0.0, 0.0]]).view(shape)
    x_uncond = torch.tensor([[0.25, 1.0], [0.0, 0.0]]).view(shape)
    x_fake = torch.tensor([[1.0, 2.5], [0.5, -0.5]]).view(shape)
    rewards = torch.tensor([0.5, -0.25])
    return x, x_cond, x_uncond, x_fake, rewards


def test_redmd_loss_and_gradient_match_hand_computation():
    x, x_cond, x_uncond, x_fake, rewards = _hand_example()
    x.requires_grad_(True)
    # By hand: sample 0: x_real = x_c + 3 (x_c - x_u) = [1.25, 3.0]; normaliser mean|x - x_real| =
    # (0.25 + 1) / 2 = 0.625; g = ([1.0, 2.5] - [1.25, 3.0]) / 0.625 = [-0.4, -0.8]; w = exp(2 * 0.5) = e.
    # Sample 1: x_real = [0, 0]; normaliser (0 + 1) / 2 = 0.5; g = [1, -1]; w = exp(2 * -0.25) = e^-0.5.
    # Loss = 0.5 * mean_b(w_b * mean(g_b^2)) = 0.25 * (0.4 e + e^-0.5).
    # dLoss/dx_b = w_b * g_b / (B * N) with B = N = 2.
    x_real = cfg_x0(x_cond, x_uncond, 3.0)
    torch.testing.assert_close(x_real.flatten(), torch.tensor([1.25, 3.0, 0.0, 0.0]))
    g = dmd_gradient(x, x_fake, x_real)
    torch.testing.assert_close(g.flatten(), torch.tensor([-0.4, -0.8, 1.0, -1.0], dtype=torch.float64))
    w = reward_weights(rewards, beta=2.0, batch=2, device="cpu")
    loss = redmd_loss(x, g, w)
    e = math.e
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.25 * (0.4 * e + e**-0.5), rel=1e-12)
    loss.backward()
    expected = torch.tensor([e * -0.1, e * -0.2, e**-0.5 * 0.25, e**-0.5 * -0.25], dtype=torch.float64)
    torch.testing.assert_close(x.grad.flatten(), expected, rtol=1e-12, atol=0)


def test_zero_beta_or_no_reward_is_plain_dmd():
    x, x_cond, x_uncond, x_fake, rewards = _hand_example()
    g = dmd_gradient(x, x_fake, cfg_x0(x_cond, x_uncond, 3.0))
    plain = redmd_loss(x, g, reward_weights(None, 2.0, 2, "cpu"))
    assert plain.item() == pytest.approx(0.25 * (0.4 + 1.0), rel=1e-12)  # weights 1
    assert redmd_loss(x, g, reward_weights(rewards, 0.0, 2, "cpu")).item() == plain.item()
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        reward_weights(torch.zeros(3), 2.0, 2, "cpu")


def test_dmd_gradient_is_finite_when_the_sample_equals_the_teacher():
    x = torch.zeros(1, 1, 1, 1, 2)
    g = dmd_gradient(x, torch.ones_like(x), torch.zeros_like(x))  # normaliser 0 -> inf -> finite
    assert torch.isfinite(g).all()


def test_critic_flow_loss_matches_hand_computation():
    v = torch.tensor([[1.0, -2.0]]).view(1, 1, 1, 1, 2)
    x = torch.tensor([[0.5, 0.5]]).view(1, 1, 1, 1, 2)
    eps = torch.tensor([[1.0, 1.0]]).view(1, 1, 1, 1, 2)
    # target eps - x = [0.5, 0.5]; errors [0.5, -2.5]; mean of squares (0.25 + 6.25) / 2 = 3.25
    assert critic_flow_loss(v, x, eps).item() == pytest.approx(3.25)


def test_timestep_sampling_shift_and_clamp_rates():
    # §9.4: t = 1000 * 5u / (1 + 4u) with u = k / 1000, k uniform in [0, 1000); k <= 4 clamps to 20
    # (0.5 %), k >= 908 clamps to 980 (9.2 %).
    t = sample_timesteps(200_000, torch.Generator().manual_seed(0))
    assert t.min().item() == 20.0 and t.max().item() == 980.0
    assert (t == 20.0).double().mean().item() == pytest.approx(0.005, abs=0.001)
    assert (t == 980.0).double().mean().item() == pytest.approx(0.092, abs=0.003)
    inner = t[(t > 20) & (t < 980)].double()
    k = 1000 * (inner / 1000) / (5 - 4 * inner / 1000)  # inverse of the shift: integers
    torch.testing.assert_close(k, k.round(), atol=2e-3, rtol=0)


def test_per_sample_noise_and_x0_equal_scalar_schedule_per_sample():
    sched = FlowSchedule(5.0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 2, 2, generator=g)
    eps = torch.randn(2, 3, 4, 2, 2, generator=g)
    v = torch.randn(2, 3, 4, 2, 2, generator=g)
    t = torch.tensor([37.0, 812.5])
    xt = add_noise(sched, x0, eps, t)

    class Flow(torch.nn.Module):  # a "model" returning a fixed flow (channel-major in, out)
        def forward(self, x, tt, context):
            return v.permute(0, 2, 1, 3, 4)

    x0_pred = predict_x0(sched, Flow(), xt, t, torch.zeros(2, 1, 1))
    for b in range(2):
        torch.testing.assert_close(xt[b], sched.add_noise(x0[b], eps[b], float(t[b])))
        ref = sched.x0_from_flow(v[b].double(), xt[b].double(), float(t[b]))
        torch.testing.assert_close(x0_pred[b], ref)
