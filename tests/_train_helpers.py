"""Tiny Re-DMD set-ups shared by the training tests (CPU, fp32, a few tokens per frame)."""

from __future__ import annotations

import copy

import torch

from rf_core.tiny import random_model, random_prompt
from rf_core.train.config import TrainConfig
from rf_core.train.rewards import MotionReward
from rf_core.train.trainer import PromptSet, ReDMDTrainer

LATENT_HW = (4, 6)  # 32 x 48 pixels: 6 tokens per latent frame


def tiny_config(output_dir, **sections) -> TrainConfig:
    """Small video, no accumulation, large learning rates so a few steps move the weights."""
    d = {
        "video": {"frames": 6, "height": 32, "width": 48},
        "optim": {
            "gradient_accumulation": 1,
            "critic_steps_per_generator": 2,
            "ema_start_step": 1,
            "lr": 1e-3,
            "lr_critic": 1e-3,
        },
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0},
        "run": {"steps": 4, "save_every": 2, "output_dir": str(output_dir), "device": "cpu"},
        "reward": {"kind": "none"},
    }
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return TrainConfig.from_dict(d)


def tiny_prompts() -> PromptSet:
    return PromptSet(random_prompt("tiny", batch=4, seed=3), random_prompt("tiny", batch=1, seed=4)[0])


def tiny_trainer(config: TrainConfig, reward=None, dist=None, interrupt=None, **models) -> ReDMDTrainer:
    """Student seed 1, teacher seed 2, critic = a copy of the teacher (as the reference)."""
    gen = models.get("generator") or random_model("tiny", seed=1)
    teacher = models.get("teacher") or random_model("tiny", seed=2)
    critic = models.get("critic") or copy.deepcopy(teacher)
    if reward is None:
        reward = MotionReward(latent_center=1.5, latent_scale=0.1)  # tiny rollouts: 1.3-1.75
    return ReDMDTrainer(
        config, gen, teacher, critic, tiny_prompts(), reward=reward, dist=dist, interrupt=interrupt
    )


def trainable_state(trainer: ReDMDTrainer) -> dict[str, torch.Tensor]:
    """Generator and critic trainable weights, EMA and optimiser moments, as plain tensors."""
    out = {f"gen.{k}": p.detach().clone() for k, p in trainer.gen_params.items()}
    out.update({f"critic.{k}": p.detach().clone() for k, p in trainer.critic_params.items()})
    if trainer.ema is not None:
        out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.full_state().items()})
    for name, opt in (("gen_opt", trainer.gen_opt), ("critic_opt", trainer.critic_opt)):
        for i, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                out[f"{name}.{i}.{k}"] = v.clone()
    return out
