"""Re-DMD trainer: generator (student), critic (fake score) and teacher (real score) with the
optimisation loop of reference-algorithm.md §9.6, done as intended (§13.17 lists what we fix).

One training step = one critic optimiser step over ``gradient_accumulation`` micro-batches; every
``critic_steps_per_generator``-th step (starting at step 0) first takes one generator optimiser
step over as many micro-batches, then updates the EMA. Each optimiser step clips the gradient norm,
steps once and zeroes the gradients. A rollout longer than ``video.grad_frames`` (21) trains on its
last ``grad_frames`` latent frames only, as the reference's gradient window: the earlier chunks run
without gradients, and the teacher, the critic and the reward see the window.

Determinism: every random draw (prompt order, rollout noise, exit step, DMD timestep and noise)
comes from a generator seeded by (run seed, step, phase, micro-batch, global sample index), so a
resumed run repeats an uninterrupted one exactly, and N ranks with batch b give the same samples
as one process with batch N·b.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from rf_core.io.safe_load import save_tensors
from rf_core.lora import save_lora
from rf_core.model.dit import WanDiT
from rf_core.schedule import FlowSchedule
from rf_core.train import checkpointing as ckpt
from rf_core.train.config import TrainConfig
from rf_core.train.distributed import DistInfo, all_mean, broadcast_int, shard_dit
from rf_core.train.ema import EMA
from rf_core.train.lora_train import DOWN, UP, add_lora, lora_modules
from rf_core.train.losses import (
    add_noise,
    cfg_x0,
    critic_flow_loss,
    dmd_gradient,
    predict_flow,
    predict_x0,
    redmd_loss,
    reward_weights,
    sample_timesteps,
)
from rf_core.train.rewards import Reward, needs_pixels
from rf_core.train.rollout import rollout, training_stream_config

# latents [B, F, 16, h, w] -> frames [B, T, 3, H, W] in [0, 1]
Decoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PromptSet:
    """Training prompts: precomputed embeddings [N, L, D], or an ``encoder`` (texts -> [B, L, D])
    that encodes each micro-batch's prompts when it is drawn (prompt lists too large to precompute);
    the negative prompt's embedding [L, D]; the N prompt texts (read by rewards such as VideoAlign)."""

    embeds: torch.Tensor | None
    negative: torch.Tensor
    texts: list[str] = field(default_factory=list)
    encoder: Callable[[list[str]], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.negative.ndim == 3 and self.negative.shape[0] == 1:
            self.negative = self.negative[0]
        if self.embeds is None:
            if self.encoder is None or not self.texts:
                raise ValueError("a prompt set without embeddings needs prompt texts and an encoder")
            return
        if self.embeds.ndim != 3 or self.embeds.shape[0] == 0:
            raise ValueError(f"prompt embeddings must be [N >= 1, L, D], got {list(self.embeds.shape)}")
        if self.negative.shape != self.embeds.shape[1:]:
            raise ValueError(
                f"negative prompt embedding {list(self.negative.shape)} does not match the prompts' "
                f"{list(self.embeds.shape[1:])}"
            )
        if not self.texts:
            self.texts = [""] * self.embeds.shape[0]
        if len(self.texts) != self.embeds.shape[0]:
            raise ValueError(f"{len(self.texts)} prompt texts for {self.embeds.shape[0]} embeddings")

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Embeddings [B, L, D] of the given prompts."""
        if self.embeds is not None:
            return self.embeds[list(indices)]
        with torch.no_grad():
            return self.encoder([self.texts[i] for i in indices])


class ReDMDTrainer:
    """Args:
    config: the run's hyper-parameters.
    generator: the causal student (float32 weights; it is trained in place, fully or via LoRA).
    teacher: the real score, a bidirectional Wan DiT (frozen; cast to the compute dtype).
    critic: the fake score (trained; usually a copy of the teacher or of the base 1.3B).
    prompts: training prompts and the negative prompt.
    reward: ``reward(frames, prompts) -> [B]`` or None (plain DMD).
    decoder: latents -> frames in [0, 1] for the reward; None feeds latents to rewards that allow it.
    dist: process group info (``init_distributed``); None = one process on ``config.run.device``.
    interrupt: called before every model pass; raise from it to stop (ComfyUI Cancel).
    """

    def __init__(
        self,
        config: TrainConfig,
        generator: WanDiT,
        teacher: nn.Module,
        critic: nn.Module,
        prompts: PromptSet,
        reward: Reward | None = None,
        decoder: Decoder | None = None,
        dist: DistInfo | None = None,
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.config = cfg = config
        if dist is None:
            dev = cfg.run.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dist = DistInfo(device=torch.device(dev))
        self.dist = dist
        self.device = dev = dist.device
        self.autocast = dev.type == "cuda" and cfg.run.mixed_precision == "bf16"
        self.compute_dtype = torch.bfloat16 if self.autocast else torch.float32
        if reward is not None and needs_pixels(reward) and decoder is None:
            raise ValueError("this reward needs decoded frames: give a VAE (model.vae) / decoder")
        self.reward, self.decoder, self.prompts = reward, decoder, prompts
        self.interrupt = interrupt
        self.schedule = FlowSchedule(cfg.loss.timestep_shift)
        self.stream_config = training_stream_config(
            cfg.video.denoise_steps,
            cfg.loss.timestep_shift,
            cfg.video.chunk_frames,
            cfg.video.sink_frames,
            cfg.video.window_frames,
        )
        # A frozen base can be stored at the compute precision; FSDP needs one dtype per unit.
        low_base = self.autocast and not dist.enabled
        self.generator = self._prepare_trainable(generator, cfg.lora.enabled, low_base, seed_key="gen")
        self.critic = self._prepare_trainable(
            critic, cfg.lora.enabled and cfg.lora.critic, low_base, seed_key="critic"
        )
        # The teacher keeps its dtype (the caller picks it; bf16 under autocast is typical) and is
        # only moved if needed, so a model shared with other ComfyUI nodes is not converted.
        self.teacher = teacher.to(dev).eval().requires_grad_(False)
        if dist.enabled:
            for m in (self.generator, self.critic, self.teacher):
                shard_dit(m, dist)
        o = cfg.optim
        self.gen_params = {n: p for n, p in self.generator.named_parameters() if p.requires_grad}
        self.critic_params = {n: p for n, p in self.critic.named_parameters() if p.requires_grad}
        adam = dict(betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        self.gen_opt = torch.optim.AdamW(list(self.gen_params.values()), lr=o.lr, **adam)
        self.critic_opt = torch.optim.AdamW(list(self.critic_params.values()), lr=o.lr_critic, **adam)
        self.ema: EMA | None = None
        self.step = 0
        self.history: list[dict] = []
        self.negative = prompts.negative.to(dev)
        self._perms: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def _prepare_trainable(self, model: nn.Module, lora: bool, low_base: bool, seed_key: str) -> nn.Module:
        cfg = self.config
        if lora:
            model.to(self.device, self.compute_dtype if low_base else torch.float32)
            add_lora(
                model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=self._seed("lora", seed_key)
            )
        else:
            model.to(self.device, torch.float32).requires_grad_(True)
        model.train()
        model.gradient_checkpointing = cfg.run.gradient_checkpointing
        return model

    def _seed(self, *parts) -> int:
        digest = hashlib.blake2b(repr((self.config.run.seed, *parts)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 2

    def _rng(self, *parts) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(*parts))

    def _amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def _check(self) -> None:
        if self.interrupt is not None:
            self.interrupt()

    # ------------------------------------------------------------------ data
    def _prompt_index(self, counter: int) -> int:
        """Prompt of the ``counter``-th global sample: epochs of seeded permutations."""
        n = len(self.prompts)
        epoch = counter // n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(n, generator=self._rng("perm", epoch))}
        return int(self._perms[epoch][counter % n])

    def _micro_batch(self, phase: int, micro: int) -> tuple[torch.Tensor, list[str], int, list[int]]:
        """This rank's slice of the global micro-batch: embeddings, texts, rollout seed, global positions."""
        b, o = self.config.optim.batch_size, self.config.optim
        size = b * self.dist.world_size
        first = ((self.step * 2 + phase) * o.gradient_accumulation + micro) * size
        positions = list(range(self.dist.rank * b, (self.dist.rank + 1) * b))
        idx = [self._prompt_index(first + j) for j in positions]
        embeds = self.prompts.batch(idx).to(self.device, torch.float32)
        texts = [self.prompts.texts[i] for i in idx]
        # StreamSession seeds sample i with seed + i, so sample j of the global batch gets base + j.
        seed = self._seed("noise", self.step, phase, micro) + positions[0]
        return embeds, texts, seed, positions

    def _exit_step(self, phase: int, micro: int) -> int:
        """Exit step shared by all chunks and ranks: drawn on rank 0, broadcast (§9.3)."""
        e = 0
        if self.dist.is_main:
            n = len(self.config.video.denoise_steps)
            e = int(torch.randint(0, n, (1,), generator=self._rng("exit", self.step, phase, micro)))
        return broadcast_int(e, self.dist)

    def _score_noise(self, x: torch.Tensor, phase: int, micro: int, positions: Sequence[int]):
        """Per-sample DMD/critic timestep [B] and noise like x."""
        ts, eps = [], []
        loss = self.config.loss
        for j in positions:
            g = self._rng("score", self.step, phase, micro, j)
            ts.append(sample_timesteps(1, g, loss.timestep_shift, loss.min_timestep, loss.max_timestep))
            eps.append(torch.randn(x.shape[1:], generator=g))
        t = torch.cat(ts).to(self.device)
        return t, torch.stack(eps).to(self.device, x.dtype)

    def _rollout(self, embeds: torch.Tensor, seed: int, exit_step: int, grad: bool) -> torch.Tensor:
        cache_dtype = self.compute_dtype if self.autocast else None
        with self._amp():
            return rollout(
                self.generator,
                embeds,
                self.config.latent_hw,
                self.config.video.frames,
                exit_step,
                seed,
                self.stream_config,
                grad=grad,
                cache_dtype=cache_dtype,
                interrupt=self.interrupt,
                grad_frames=self.config.video.grad_frames,
            )

    @property
    def window_start(self) -> int:
        """First latent frame of a rollout's gradient window (the last ``video.grad_frames``): the
        teacher, critic and reward see frames from here on; earlier chunks only set the context."""
        v = self.config.video
        return max(0, v.frames - v.grad_frames)

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def rewards(self, latents: torch.Tensor, texts: Sequence[str], first: int = 0) -> torch.Tensor | None:
        """Reward of each sample on latent frames ``first`` onwards. With a ``decoder`` the whole
        rollout is decoded (so the window's frames are decoded with their causal context) and the
        window's video frames are kept: every latent after the first decodes to the same number of
        frames (4 for the Wan VAE)."""
        if self.reward is None:
            return None
        latents = latents.detach()
        if self.decoder is None:
            frames = latents[:, first:]
        else:
            frames = self.decoder(latents)
            if first:
                per_latent = (frames.shape[1] - 1) // (latents.shape[1] - 1)
                frames = frames[:, frames.shape[1] - per_latent * (latents.shape[1] - first) :]
        return self.reward(frames, list(texts)).detach().float().reshape(-1).to(self.device)

    @torch.no_grad()
    def _dmd_direction(self, x, embeds, positions, micro) -> torch.Tensor:
        t, eps = self._score_noise(x, 0, micro, positions)
        x_t = add_noise(self.schedule, x.detach(), eps, t)
        neg = self.negative[None].expand(x.shape[0], -1, -1)
        with self._amp():
            self._check()
            x_fake = predict_x0(self.schedule, self.critic, x_t, t, embeds)
            self._check()
            x_c = predict_x0(self.schedule, self.teacher, x_t, t, embeds)
            self._check()
            x_u = predict_x0(self.schedule, self.teacher, x_t, t, neg)
        return dmd_gradient(x, x_fake, cfg_x0(x_c, x_u, self.config.loss.guidance_scale))

    def _generator_phase(self) -> dict:
        o = self.config.optim
        losses, rewards, weights, exits = [], [], [], []
        for micro in range(o.gradient_accumulation):
            self._sync_grads(self.generator, micro)
            embeds, texts, seed, positions = self._micro_batch(0, micro)
            e = self._exit_step(0, micro)
            rolled = self._rollout(embeds, seed, e, grad=True)
            x = rolled[:, self.window_start :]
            r = self.rewards(rolled, texts, self.window_start)
            w = reward_weights(r, self.config.loss.beta, x.shape[0], self.device)
            g = self._dmd_direction(x, embeds, positions, micro)
            loss = redmd_loss(x, g, w)
            (loss / o.gradient_accumulation).backward()
            losses.append(loss.item())
            weights.append(w.mean().item())
            exits.append(e)
            if r is not None:
                rewards.append(r.mean().item())
        norm = self._optimizer_step(self.gen_opt, self.gen_params)
        if self.ema is not None:
            self.ema.update()
        elif self.step >= o.ema_start_step:
            self.ema = EMA(self.gen_params, o.ema_decay, device="cpu" if o.ema_on_cpu else None)
        return {
            "generator_loss": self._mean(losses),
            "reward": self._mean(rewards) if rewards else None,
            "weight": self._mean(weights),
            "generator_grad_norm": norm,
            "exit_step": exits[0] if len(set(exits)) == 1 else sum(exits) / len(exits),
        }

    def _critic_phase(self) -> dict:
        o = self.config.optim
        losses = []
        for micro in range(o.gradient_accumulation):
            self._sync_grads(self.critic, micro)
            embeds, _, seed, positions = self._micro_batch(1, micro)
            e = self._exit_step(1, micro)
            with torch.no_grad():
                x = self._rollout(embeds, seed, e, grad=False)[:, self.window_start :]
            t, eps = self._score_noise(x, 1, micro, positions)
            x_t = add_noise(self.schedule, x, eps, t)
            self._check()
            with self._amp():
                v = predict_flow(self.critic, x_t, t, embeds)
            loss = critic_flow_loss(v, x, eps)
            (loss / o.gradient_accumulation).backward()
            losses.append(loss.item())
        return {
            "critic_loss": self._mean(losses),
            "critic_grad_norm": self._optimizer_step(self.critic_opt, self.critic_params),
        }

    def _sync_grads(self, model: nn.Module, micro: int) -> None:
        """Under FSDP, reduce-scatter gradients only on the last micro-batch of an accumulation."""
        if self.dist.enabled:
            model.set_requires_gradient_sync(micro == self.config.optim.gradient_accumulation - 1)

    def _optimizer_step(self, opt: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> float:
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), self.config.optim.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    def _mean(self, values: list[float]) -> float:
        return all_mean(sum(values) / len(values), self.dist)

    def train_step(self) -> dict:
        """One critic step, preceded by a generator step every ``critic_steps_per_generator`` steps."""
        start = time.perf_counter()
        row: dict = {"step": self.step}
        if self.step % self.config.optim.critic_steps_per_generator == 0:
            row.update(self._generator_phase())
        row.update(self._critic_phase())
        self.step += 1
        row["seconds"] = time.perf_counter() - start
        self.history.append(row)
        return row

    def train(self, on_step: Callable[[dict], None] | None = None) -> None:
        """Run to ``run.steps``, writing a checkpoint every ``run.save_every`` steps and at the end."""
        run = self.config.run
        while self.step < run.steps:
            self._check()
            row = self.train_step()
            if self.step % run.save_every == 0 or self.step == run.steps:
                self.save_checkpoint()
            if on_step is not None:
                on_step(row)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.run.output_dir) / "checkpoints"

    def state(self) -> dict:
        """Everything needed to continue the run (a collective under FSDP; complete on rank 0)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return {
            "generator": get_model_state_dict(self.generator, options=opts),
            "critic": get_model_state_dict(self.critic, options=opts),
            "generator_optim": get_optimizer_state_dict(self.generator, self.gen_opt, options=opts),
            "critic_optim": get_optimizer_state_dict(self.critic, self.critic_opt, options=opts),
            "ema": None if self.ema is None else self.ema.full_state(),
            "rng": ckpt.rng_state(),
            "history": [{k: v for k, v in r.items() if v is not None} for r in self.history],
            "config": self.config.to_json(),
        }

    def save_checkpoint(self) -> Path:
        state = self.state()
        path = ckpt.checkpoint_path(self.checkpoint_dir, self.step)
        if self.dist.is_main:
            ckpt.save_checkpoint(state, self.checkpoint_dir, self.step, self.config.run.keep_checkpoints)
        return path

    def load_state(self, state: dict, source: str = "checkpoint") -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        for name, model, params in (
            ("generator", self.generator, self.gen_params),
            ("critic", self.critic, self.critic_params),
        ):
            got, want = set(state[name]), set(params)
            bad = sorted(got ^ want) or [
                k for k in want if tuple(state[name][k].shape) != tuple(params[k].shape)
            ]
            if bad:
                raise ValueError(
                    f"{source}: {name} weights do not match this run's trainable parameters "
                    f"(full vs LoRA, LoRA rank or targets changed?); differing keys e.g. {bad[:3]}"
                )
            set_model_state_dict(
                model, state[name], options=StateDictOptions(full_state_dict=True, strict=False)
            )
        full = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.generator, self.gen_opt, state["generator_optim"], options=full)
        set_optimizer_state_dict(self.critic, self.critic_opt, state["critic_optim"], options=full)
        self.ema = None
        if state["ema"] is not None:
            o = self.config.optim
            self.ema = EMA(self.gen_params, o.ema_decay, device="cpu" if o.ema_on_cpu else None)
            self.ema.load_full_state(state["ema"])
        ckpt.set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.step = int(state["step"])

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Continue from ``path`` or from the newest checkpoint of this run; None if there is none."""
        path = Path(path) if path is not None else ckpt.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return None
        self.load_state(ckpt.load_checkpoint(path), source=str(path))
        return path

    # ------------------------------------------------------------------ output
    @property
    def export_path(self) -> Path:
        return Path(self.config.run.output_dir) / f"{self.config.run.output_name}.safetensors"

    def export(self, path: str | Path | None = None) -> Path:
        """Write the trained generator (a collective under FSDP; rank 0 writes): a LoRA in
        ``rf_core.lora``'s canonical layout, or full Wan-named weights (bf16) that ``load_dit`` reads.
        Uses the EMA weights when ``run.export`` is "ema" and the EMA has started."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        path = Path(path) if path is not None else self.export_path
        use_ema = self.config.run.export == "ema" and self.ema is not None
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if use_ema:
            trained = self.ema.full_state()
        else:
            trained = get_model_state_dict(
                self.generator,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True),
            )
        meta = {
            "rf_trained_by": "reward-forcing redmd",
            "rf_train_step": str(self.step),
            "rf_train_weights": "ema" if use_ema else "raw",
            "rf_train_config": self.config.to_json(),
        }
        if self.config.lora.enabled:
            if self.dist.is_main:  # gathered state dicts are empty on the other ranks
                pairs = {
                    name: (trained[f"{name}.{DOWN}"], trained[f"{name}.{UP}"], module.lora_alpha)
                    for name, module in lora_modules(self.generator).items()
                }
                path.parent.mkdir(parents=True, exist_ok=True)
                save_lora(path, pairs, metadata=meta)
            return path
        weights = get_model_state_dict(self.generator, options=full)
        if self.dist.is_main:
            weights.update(trained)
            weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}
            meta.update(
                {"format": "pt", "rf_kind": "wan-dit", "rf_config": json.dumps(self.generator.cfg.to_dict())}
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, weights, meta)
        return path
