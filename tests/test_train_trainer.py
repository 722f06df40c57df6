"""The trainer's wiring at its call sites, against hand computations (reference-algorithm.md §9.3,
§9.4): the exit step drawn per rollout, the teacher's guidance on the prompt and the negative
prompt, the DMD gradient's sign, the per-sample reward weight, and the gradient window of rollouts
longer than ``video.grad_frames``."""

import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
from _train_helpers import tiny_config, tiny_prompts

from rf_core.schedule import FlowSchedule
from rf_core.tiny import random_model
from rf_core.train import trainer as trainer_module
from rf_core.train.rollout import rollout
from rf_core.train.trainer import PromptSet, ReDMDTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

BETA, GUIDANCE = 2.0, 3.0
REWARDS = (0.5, -0.25)  # fixed per-sample rewards of a batch of 2


class RolloutSpy:
    """Wraps the trainer's ``rollout``: records each call's arguments and output."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        monkeypatch.setattr(trainer_module, "rollout", self)

    def __call__(self, model, prompt_embeds, latent_hw, num_frames, exit_step, seed, config, **kw):
        out = rollout(model, prompt_embeds, latent_hw, num_frames, exit_step, seed, config, **kw)
        self.calls.append(
            dict(
                args=(prompt_embeds, latent_hw, num_frames, exit_step, seed, config),
                kwargs=kw,
                out=out.detach().clone(),
            )
        )
        return out


class ContextFlow(nn.Module):
    """A score model whose flow is v = x_t · (k + c), c the mean of the sample's text context: its
    x0 prediction x_t·(1 − σ(k + c)) tells which context it was given. Records its inputs."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, context):
        self.calls.append((x.detach().clone(), t.detach().clone(), context.detach().clone()))
        c = context.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return x * (self.k + c)


class FixedReward:
    """Rewards ``REWARDS`` whatever it sees (latents: no decoder); records the frames it was given."""

    needs_pixels = False

    def __init__(self) -> None:
        self.frames: list[torch.Tensor] = []

    def __call__(self, frames, prompts):
        self.frames.append(frames.clone())
        return torch.tensor(REWARDS)


def shifted_prompts() -> PromptSet:
    """The tiny prompts with distinct context means: prompts +0.3, +0.5, ..., negative −0.4."""
    p = tiny_prompts()
    embeds = p.embeds - p.embeds.mean(dim=(1, 2), keepdim=True)
    embeds = embeds + torch.tensor([0.3, 0.5, 0.7, 0.9]).view(-1, 1, 1)
    return PromptSet(embeds, p.negative - p.negative.mean() - 0.4)


def wired_trainer(tmp_path, monkeypatch, **video):
    cfg = tiny_config(
        tmp_path,
        video={"frames": 3, **video},
        loss={"beta": BETA, "guidance_scale": GUIDANCE},
        optim={"batch_size": 2},
        lora={"critic": False},
    )
    teacher, critic = ContextFlow(0.0), ContextFlow(0.2)
    trainer = ReDMDTrainer(
        cfg,
        random_model("tiny", seed=1),
        teacher,
        critic,
        shifted_prompts(),
        reward=FixedReward(),
    )
    grads = []

    def record_and_skip(opt, params):  # keep the gradients, leave the weights as they were
        grads.append({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})
        opt.zero_grad(set_to_none=True)
        return 0.0

    monkeypatch.setattr(trainer, "_optimizer_step", record_and_skip)
    return trainer, teacher, critic, RolloutSpy(monkeypatch), grads


@pytest.mark.parametrize("frames", [3, 9])
def test_generator_gradient_matches_a_hand_computed_redmd_step(tmp_path, monkeypatch, frames):
    """One generator micro-batch (batch 2, β = 2, rewards +0.5 and −0.25). By hand, from the noisy
    sample x_t and timestep t the score models were given:
      x̂_c = x_t·(1 − σ c_prompt), x̂_u = x_t·(1 − σ c_negative)   (teacher on prompt / negative)
      x̂_real = x̂_c + 3 (x̂_c − x̂_u);  x̂_fake = x_t·(1 − σ (0.2 + c_prompt))   (critic, no CFG)
      g = (x̂_fake − x̂_real) / mean|x − x̂_real|;  dL/dx_b = exp(β r_b) g_b / (B N)
    and the generator's gradient is that vector pulled back through the rollout. It differs if the
    prompt and the negative prompt swap branches, if the critic gets the negative prompt, if g's
    sign flips, or if the weights are dropped, averaged or taken from sample 0. With 9 frames and
    the default 21-frame window everything sees all frames; with ``grad_frames`` 6 only the last 6
    (the first chunk is generated without gradients)."""
    window = 6 if frames == 9 else 3
    trainer, teacher, critic, spy, grads = wired_trainer(
        tmp_path, monkeypatch, frames=frames, grad_frames=window
    )
    trainer._generator_phase()

    (call,) = spy.calls
    embeds, hw, num_frames, exit_step, seed, config = call["args"]
    assert num_frames == frames
    (scored,) = trainer.reward.frames  # the reward scores the window
    torch.testing.assert_close(scored, call["out"][:, frames - window :], rtol=0, atol=0)
    # the three score passes saw one noisy sample: the window's frames only
    assert len(teacher.calls) == 2 and len(critic.calls) == 1
    x_t, t, _ = critic.calls[0]
    assert x_t.shape[2] == window  # channel-major [B, C, F, h, w]
    for xt_i, t_i, _ in teacher.calls:
        assert torch.equal(xt_i, x_t) and torch.equal(t_i, t)

    # hand computation in float64, frame-major [B, F, C, h, w]
    x = call["out"][:, frames - window :].double()
    xt = x_t.permute(0, 2, 1, 3, 4).double()
    sigma = FlowSchedule(5.0).sigma(t).double().view(-1, 1, 1, 1, 1)
    c_prompt = embeds.double().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    c_neg = trainer.prompts.negative.double().mean()
    x_c = xt * (1 - sigma * c_prompt)
    x_u = xt * (1 - sigma * c_neg)
    x_real = x_c + GUIDANCE * (x_c - x_u)
    x_fake = xt * (1 - sigma * (0.2 + c_prompt))
    g = (x_fake - x_real) / (x - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    weights = torch.tensor([math.exp(BETA * r) for r in REWARDS], dtype=torch.float64).view(-1, 1, 1, 1, 1)
    d_loss_d_x = weights * g / x[0].numel() / x.shape[0]

    # pull it back through the same rollout (seeded: it repeats exactly) with the weights unchanged
    params = trainer.gen_params
    again = rollout(trainer.generator, embeds, hw, num_frames, exit_step, seed, config, **call["kwargs"])
    torch.testing.assert_close(again.detach(), call["out"], rtol=0, atol=0)
    if frames > window:  # the chunks before the window carry no gradient
        before = torch.autograd.grad(
            again[:, : frames - window].sum(), list(params.values()), retain_graph=True, allow_unused=True
        )
        assert all(b is None or not b.any() for b in before)
    expected = torch.autograd.grad(
        again[:, frames - window :], list(params.values()), d_loss_d_x.float(), allow_unused=True
    )
    (got,) = grads
    assert got.keys() == {n for n, e in zip(params, expected) if e is not None}
    checked = 0
    for name, e in zip(params, expected):
        if e is not None:
            torch.testing.assert_close(got[name], e, rtol=1e-4, atol=1e-9, msg=name)
            checked += int(e.abs().max() > 0)
    assert checked > 0


def test_exit_step_is_drawn_per_rollout_over_all_steps(tmp_path, monkeypatch):
    """§9.3: each rollout draws its exit step uniformly from {0, 1, 2, 3} (one for all its chunks);
    the generator's and the critic's rollouts reach every step, not always the last, and the logged
    exit step is the one the rollout used."""
    cfg = tiny_config(
        tmp_path,
        video={"frames": 3},
        optim={"critic_steps_per_generator": 1, "ema_start_step": 1000},
        run={"steps": 24, "save_every": 1000},
    )
    trainer = ReDMDTrainer(
        cfg, random_model("tiny", seed=1), ContextFlow(0.0), ContextFlow(0.2), shifted_prompts()
    )
    spy = RolloutSpy(monkeypatch)
    trainer.train()
    generator = [c["args"][3] for c in spy.calls if c["kwargs"]["grad"]]
    critic = [c["args"][3] for c in spy.calls if not c["kwargs"]["grad"]]
    assert len(generator) == len(critic) == 24
    for draws in (generator, critic):
        counts = Counter(draws)
        assert set(counts) == {0, 1, 2, 3}, counts
    assert [row["exit_step"] for row in trainer.history] == generator
    # the draw itself is uniform: 4000 draws, each step 25 % ± 3 %
    many = Counter(trainer._exit_step(phase, micro) for phase in (0, 1) for micro in range(2000))
    assert all(abs(n / 4000 - 0.25) < 0.03 for n in many.values()) and len(many) == 4, many


def test_critic_gradient_matches_a_hand_computed_flow_loss_on_the_window(tmp_path, monkeypatch):
    """Critic micro-batch of a 9-frame rollout with a 6-frame window: the critic sees the window's
    last 6 frames noised, x_t = (1 − σ) x + σ ε, on the prompt; its loss mean((v − (ε − x))²) with
    v = x_t (k + c_prompt) has dL/dk = mean(2 (v − (ε − x)) x_t), ε recovered from x_t by hand."""
    trainer, teacher, critic, spy, grads = wired_trainer(tmp_path, monkeypatch, frames=9, grad_frames=6)
    trainer._critic_phase()
    (call,) = spy.calls
    assert not call["kwargs"]["grad"] and not teacher.calls
    (c,) = critic.calls
    x = call["out"][:, 3:].double()
    xt = c[0].permute(0, 2, 1, 3, 4).double()
    assert xt.shape == x.shape
    sigma = FlowSchedule(5.0).sigma(c[1]).double().view(-1, 1, 1, 1, 1)
    eps = (xt - (1 - sigma) * x) / sigma
    assert 0.8 < eps.std().item() < 1.2  # x_t is the window noised with unit noise, not another tensor
    c_prompt = call["args"][0].double().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    v = xt * (0.2 + c_prompt)
    expected = (2 * (v - (eps - x)) * xt).mean()
    (got,) = grads
    torch.testing.assert_close(got["k"].double(), expected, rtol=1e-4, atol=1e-7)


def test_decoded_reward_sees_the_windows_frames_decoded_in_context(tmp_path):
    """With a decoder the whole rollout is decoded and the reward gets the video frames of the
    window's latents (each latent after the first is 4 frames, as with the Wan VAE)."""
    seen = []

    def decoder(latents):  # frame j of the video holds j (latent 0 -> frame 0, latent k -> 4k-3..4k)
        n = 1 + 4 * (latents.shape[1] - 1)
        return torch.arange(n, dtype=torch.float32).view(1, n, 1, 1, 1).expand(latents.shape[0], n, 3, 2, 2)

    def reward(frames, prompts):
        seen.append(frames[:, :, 0, 0, 0])
        return torch.zeros(frames.shape[0])

    cfg = tiny_config(tmp_path, video={"frames": 9, "grad_frames": 6})
    trainer = ReDMDTrainer(
        cfg, random_model("tiny", seed=1), ContextFlow(0.0), ContextFlow(0.2), tiny_prompts(), reward, decoder
    )
    assert trainer.window_start == 3
    trainer.rewards(torch.zeros(2, 9, 16, 4, 6), ["a", "b"], trainer.window_start)
    trainer.rewards(torch.zeros(2, 9, 16, 4, 6), ["a", "b"])
    torch.testing.assert_close(seen[0], torch.arange(9.0, 33.0).expand(2, 24))  # latents 3..8
    torch.testing.assert_close(seen[1], torch.arange(0.0, 33.0).expand(2, 33))
