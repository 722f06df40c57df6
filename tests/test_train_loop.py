"""The Re-DMD training loop: optimiser cadence, EMA, exact resume, export, reward effect."""

import pytest
import torch
import torch.nn as nn
from _train_helpers import LATENT_HW, tiny_config, tiny_prompts, tiny_trainer, trainable_state

from rf_core.lora import apply_lora, load_lora
from rf_core.schedule import FlowSchedule
from rf_core.tiny import random_model
from rf_core.train import checkpointing
from rf_core.train.ema import EMA
from rf_core.train.rollout import sample, training_stream_config
from rf_core.train.trainer import ReDMDTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    pass


def test_optimisers_step_once_per_accumulation_and_generator_every_k_steps(tmp_path):
    cfg = tiny_config(
        tmp_path,
        optim={"gradient_accumulation": 2, "critic_steps_per_generator": 3, "ema_start_step": 100},
        run={"steps": 5, "save_every": 100},
    )
    trainer = tiny_trainer(cfg)
    passes = []
    trainer.interrupt = lambda: passes.append(1)
    trainer.train()
    # critic: one Adam step per training step; generator at steps 0 and 3
    assert {int(s["step"]) for s in trainer.critic_opt.state_dict()["state"].values()} == {5}
    assert {int(s["step"]) for s in trainer.gen_opt.state_dict()["state"].values()} == {2}
    assert [("generator_loss" in r) for r in trainer.history] == [True, False, False, True, False]
    assert all(p.grad is None for p in trainer.gen_params.values())
    assert trainer.ema is None  # start step not reached
    # model passes: per micro-batch a rollout of 2 chunks x (exit step + 1 + context) passes plus
    # critic (+ 3 teacher/critic passes in generator micro-batches); at least 2 micro-batches/step
    assert len(passes) > 5 * 2 * 2


def test_ema_is_the_decayed_average_of_the_weights():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA({"p": p}, decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 0.0]))
    ema.update()
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 4.0]))
    ema.update()
    # 0.9 * (0.9 * [1, 2] + 0.1 * [3, 0]) + 0.1 * [5, 4] = [1.58, 2.02]
    torch.testing.assert_close(ema.full_state()["p"], torch.tensor([1.58, 2.02]))


@pytest.mark.parametrize("lora", [True, False])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, lora):
    sections = dict(
        optim={"gradient_accumulation": 2, "ema_start_step": 0},
        lora={"enabled": lora},
        run={"steps": 5, "save_every": 2},
    )
    straight = tiny_trainer(tiny_config(tmp_path / "a", **sections))
    straight.train()

    calls = []

    def kill_in_step_3():  # after the step-2 checkpoint, in the middle of step 3
        calls.append(1)
        if straight_steps_done(first) == 3 and len(calls) > 40:
            raise Killed

    def straight_steps_done(tr):
        return tr.step

    first = tiny_trainer(tiny_config(tmp_path / "b", **sections), interrupt=kill_in_step_3)
    with pytest.raises(Killed):
        first.train()
    assert [s for s, _ in checkpointing.list_checkpoints(first.checkpoint_dir)] == [2]
    assert not list(first.checkpoint_dir.glob("*.tmp"))

    resumed = tiny_trainer(tiny_config(tmp_path / "b", **sections))
    assert resumed.resume() == checkpointing.checkpoint_path(first.checkpoint_dir, 2)
    assert resumed.step == 2 and resumed.ema is not None
    resumed.train()
    a, b = trainable_state(straight), trainable_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert [r["step"] for r in resumed.history] == [0, 1, 2, 3, 4]
    # keep_checkpoints=2: the newest two remain
    assert [s for s, _ in checkpointing.list_checkpoints(resumed.checkpoint_dir)] == [4, 5]


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path):
    tr = tiny_trainer(tiny_config(tmp_path, run={"steps": 1, "save_every": 1}))
    tr.train()
    other = tiny_trainer(tiny_config(tmp_path, lora={"rank": 2}))
    with pytest.raises(ValueError, match="do not match this run's trainable parameters"):
        other.resume()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.pt"):
        checkpointing.load_checkpoint(tmp_path / "bad.pt")


def test_lora_export_loads_with_our_loader_and_reproduces_the_trained_student(tmp_path):
    cfg = tiny_config(tmp_path, run={"steps": 3, "save_every": 10, "export": "raw"})
    trainer = tiny_trainer(cfg)
    trainer.train()
    path = trainer.export()
    lora = load_lora(path)
    assert lora.metadata["rf_train_weights"] == "raw" and lora.metadata["rf_train_step"] == "3"
    assert len(lora.layers) == 2 * 10  # 2 blocks x 10 default targets
    base = random_model("tiny", seed=1)
    apply_lora(base, lora)
    x = torch.randn(1, 16, 3, *LATENT_HW)
    t = torch.tensor([500.0])
    ctx = tiny_prompts().embeds[:1]
    with torch.no_grad():
        expected = trainer.generator(x, t, ctx)
        got = base(x, t, ctx)
        untrained = random_model("tiny", seed=1)(x, t, ctx)
    assert (expected - untrained).abs().max() > 1e-4  # training changed the student
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_full_export_uses_the_ema_and_loads_with_load_dit(tmp_path):
    from rf_core.io.checkpoints import load_dit

    cfg = tiny_config(tmp_path, lora={"enabled": False}, run={"steps": 5, "save_every": 10})
    trainer = tiny_trainer(cfg)
    trainer.train()
    assert trainer.ema is not None
    model = load_dit(trainer.export(), dtype=torch.float32)
    ema = trainer.ema.full_state()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ema[name].to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    assert any((ema[n] - p).abs().max() > 0 for n, p in trainer.gen_params.items())  # EMA != raw


class FrameDifference:
    """This test's reward: clamp((m − center) / scale, ±3), m the mean absolute difference of
    consecutive latent frames' channel means, an absolute motion of the tiny model's latents (the
    built-in motion reward measures latent motion relative to the latents' spread, which tiny random
    students, whose frames are nearly independent, already max out)."""

    needs_pixels = False

    def __init__(self, center: float = 0.0, scale: float = 1.0) -> None:
        self.center, self.scale = center, scale

    @staticmethod
    def motion(latents: torch.Tensor) -> torch.Tensor:
        x = latents.float().mean(dim=2)
        return (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(dim=1)

    def __call__(self, latents, prompts=()):
        return ((self.motion(latents) - self.center) / self.scale).clamp(-3.0, 3.0)


class StaticOrMoving(nn.Module):
    """A teacher whose data has static and strongly moving videos: its denoised estimate of a sample
    with motion above ``threshold`` doubles the frames' deviation from their mean, of any other
    sample it is the mean frame. Plain DMD pulls samples both ways; a motion reward favours the
    moving side."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.schedule = FlowSchedule(5.0)

    def forward(self, x, t, context):
        s = self.schedule.sigma(t).to(x).view(-1, 1, 1, 1, 1)
        mean = x.mean(dim=2, keepdim=True)
        moving = (MOTION.motion(x.transpose(1, 2)) > self.threshold).view(-1, 1, 1, 1, 1)
        target = torch.where(moving, mean + 2 * (x - mean), mean)
        return (x - target) / s


class NoisyInputCritic(nn.Module):
    """A critic predicting x0 = x_t (flow 0); learning rate 0 keeps it so."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context):
        return torch.zeros_like(x) + self.offset


MOTION = FrameDifference()


def test_motion_reward_raises_the_motion_of_generated_samples(tmp_path):
    """20 LoRA steps with a reward on motion raise the motion of samples (same seeds) above the untrained
    student's and above plain DMD's (β = 0). Over run seeds 0-7 the ratio to the untrained student was
    1.15-1.48 and the margin over plain DMD at least 0.06; the thresholds leave room below that."""
    prompts = tiny_prompts()

    def motion(model):
        x = torch.cat(
            [
                sample(
                    model, prompts.embeds[s % 4 : s % 4 + 1], LATENT_HW, 3, 100 + s, training_stream_config()
                )
                for s in range(8)
            ]
        )
        return MOTION.motion(x)

    untrained = motion(random_model("tiny", seed=1))
    results = {}
    for beta in (0.0, 2.0):
        cfg = tiny_config(
            tmp_path / str(beta),
            video={"frames": 3},
            loss={"beta": beta, "guidance_scale": 0.0, "max_timestep": 50.0},
            optim={
                "batch_size": 4,
                "critic_steps_per_generator": 1,
                "ema_start_step": 1000,
                "lr": 3e-3,
                "lr_critic": 0.0,
            },
            lora={"rank": 8, "alpha": 8.0},
            run={"steps": 20, "save_every": 1000},
        )
        trainer = ReDMDTrainer(
            cfg,
            random_model("tiny", seed=1),
            StaticOrMoving(untrained.median().item()),
            NoisyInputCritic(),
            prompts,
            reward=FrameDifference(center=untrained.mean().item(), scale=0.015),
        )
        trainer.train()
        results[beta] = motion(trainer.generator).mean().item()
    assert results[2.0] > 1.1 * untrained.mean().item()
    assert results[2.0] > results[0.0] + 0.03
