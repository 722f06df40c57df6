"""Re-DMD LoRA training in a graph: a prompt-list encoder and the "Re-DMD Train" node.

ComfyUI runs every node under ``torch.inference_mode()``, and the weights other nodes loaded are
inference tensors that autograd cannot save (comfyui-integration.md §3.7). Training therefore runs
inside ``torch.inference_mode(False)`` on copies: the student is cloned into a fresh trainable
model and the critic into another; the teacher is used as loaded (it only runs without gradients)
and is never converted or modified. The trainer is ``rf_core.train``'s, as for the CLI.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from rf_core.model.dit import WanDiT
from rf_core.text.embeddings import WAN_NEGATIVE_PROMPT

from .. import comfy
from ..common import CATEGORY, latent_hw
from ..conditioning import prompt_embeds
from ..model_handle import RFModel
from ..stream.decoders import decoder_stream

log = logging.getLogger("reward_forcing")

REWARDS = ("motion", "videoalign", "none", "custom")
# LoRA learning rates: 5x the paper's full-weight 2e-6 / 4e-7, keeping its 5:1 generator:critic ratio
GENERATOR_LR, CRITIC_LR = 1e-5, 2e-6
TRAIN_FOLDER = "reward_forcing_train"  # checkpoints and metrics, under ComfyUI's output folder


class RewardForcingEncodePromptList:
    DESCRIPTION = (
        "Encode a list of training prompts (one per line) and the negative prompt with a umT5 text encoder "
        "(CLIPLoader type 'wan') for Re-DMD Train."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("RF_PROMPT_LIST",)
    RETURN_NAMES = ("prompts",)
    OUTPUT_TOOLTIPS = ("The prompts' embeddings and texts, and the negative prompt's embedding.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "umT5-XXL text encoder (CLIPLoader, type wan)."}),
                "prompts": (
                    "STRING",
                    {"multiline": True, "default": "", "tooltip": "Training prompts, one per line."},
                ),
                "negative_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": WAN_NEGATIVE_PROMPT,
                        "tooltip": "Used by the teacher's guidance (default: Wan's standard negative prompt).",
                    },
                ),
            }
        }

    def encode(self, clip, prompts: str, negative_prompt: str):
        from rf_core.train.trainer import PromptSet

        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise ValueError("prompts is empty: write one training prompt per line")

        def embed(text: str, what: str) -> torch.Tensor:
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
            width = cond[0][0].shape[-1] if cond and isinstance(cond[0][0], torch.Tensor) else 0
            return prompt_embeds(cond, text_dim=width, text_len=max(cond[0][0].shape[1], 1), what=what)[0]

        rows = [embed(line, f"prompt {i + 1}") for i, line in enumerate(lines)]
        negative = embed(negative_prompt, "negative_prompt")
        length = max(r.shape[0] for r in (*rows, negative))
        pad = [torch.nn.functional.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows]
        negative = torch.nn.functional.pad(negative, (0, 0, 0, length - negative.shape[0]))
        return (PromptSet(torch.stack(pad), negative, lines),)


class RewardForcingReDMDTrain:
    DESCRIPTION = (
        "Fine-tune the student with Re-DMD (reward-weighted distribution matching) as a LoRA saved into "
        "models/loras. Needs the teacher (e.g. Wan2.1-T2V-1.3B loaded with Load Model), encoded prompts and a "
        "reward: motion (no extra model), VideoAlign (VideoReward folder; pip install transformers) or your "
        "own (custom: an import path). Cancel stops at once; checkpoints are kept and 'resume' continues."
    )
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora_path", "curves", "preview")
    OUTPUT_TOOLTIPS = (
        "Path of the trained LoRA (load it with Reward Forcing: LoRA).",
        "Generator loss, critic loss and reward over the steps.",
        "A video from the trained student (decoded when a VAE/decoder is connected, else a latent preview).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "student": (
                    "RF_MODEL",
                    {"tooltip": "The causal student to fine-tune (its weights are not changed)."},
                ),
                "teacher": (
                    "RF_MODEL",
                    {
                        "tooltip": "Teacher (real score), run bidirectionally: Wan2.1-T2V-1.3B or -14B weights."
                    },
                ),
                "prompts": ("RF_PROMPT_LIST", {"tooltip": "From Encode Prompt List."}),
                "reward": (
                    list(REWARDS),
                    {
                        "default": "motion",
                        "tooltip": "motion: favour movement (frame differences, no model). videoalign: VideoReward "
                        "motion-quality score (reward_source = its folder). none: plain DMD. custom: "
                        "reward_source = 'package.module:callable' taking (frames [B,T,3,H,W] in 0..1, prompts).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 200,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "Critic steps; the generator trains every 5th.",
                    },
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": GENERATOR_LR,
                        "min": 0.0,
                        "max": 1e-2,
                        "step": 1e-6,
                        "round": False,
                        "tooltip": "Generator LoRA learning rate (the paper: 2e-6 for full weights; a LoRA "
                        "needs about 5x more).",
                    },
                ),
                "critic_learning_rate": (
                    "FLOAT",
                    {
                        "default": CRITIC_LR,
                        "min": 0.0,
                        "max": 1e-2,
                        "step": 1e-7,
                        "round": False,
                        "tooltip": "Critic (fake score) learning rate. The paper's generator:critic ratio is "
                        "5:1 (2e-6 : 4e-7); keep it when changing either.",
                    },
                ),
                "batch_size": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 64,
                        "tooltip": "Rollouts generated together per micro-batch. Memory grows with it; "
                        "gradient_accumulation does not.",
                    },
                ),
                "gradient_accumulation": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 64,
                        "tooltip": "Micro-batches per optimiser step: each step sees batch_size x "
                        "gradient_accumulation rollouts (the paper: 64, over 8 GPUs) and takes that "
                        "many times longer.",
                    },
                ),
                "beta": (
                    "FLOAT",
                    {
                        "default": 2.0,
                        "min": 0.0,
                        "max": 20.0,
                        "step": 0.1,
                        "tooltip": "Reward weight exp(beta * reward); 0 = plain DMD.",
                    },
                ),
                "lora_rank": (
                    "INT",
                    {"default": 32, "min": 1, "max": 512, "tooltip": "LoRA rank (alpha = rank)."},
                ),
                "output_name": (
                    "STRING",
                    {
                        "default": "redmd_lora",
                        "tooltip": "LoRA file name in models/loras (also names the run's checkpoints).",
                    },
                ),
            },
            "optional": {
                "vae": (
                    "VAE",
                    {"tooltip": "Wan 2.1 VAE: rewards see decoded frames, and the preview is decoded."},
                ),
                "decoder": ("RF_DECODER", {"tooltip": "Or one of our decoders (Load Decoder)."}),
                "reward_source": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "videoalign: the VideoReward folder; custom: 'package.module:callable'.",
                    },
                ),
                "width": (
                    "INT",
                    {
                        "default": 832,
                        "min": 16,
                        "max": 2048,
                        "step": 16,
                        "tooltip": "Rollout width in pixels.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 480,
                        "min": 16,
                        "max": 2048,
                        "step": 16,
                        "tooltip": "Rollout height in pixels.",
                    },
                ),
                "latent_frames": (
                    "INT",
                    {
                        "default": 21,
                        "min": 3,
                        "max": 120,
                        "step": 3,
                        "tooltip": "Latent frames per rollout (21 = 81 video frames). Longer rollouts "
                        "train on their last 21: earlier chunks are generated without gradients and only "
                        "set the context.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**62,
                        "tooltip": "Seed of prompts order, noise and exit steps.",
                    },
                ),
                "save_every": (
                    "INT",
                    {"default": 25, "min": 1, "max": 100000, "tooltip": "Checkpoint interval in steps."},
                ),
                "resume": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Continue from this output name's last checkpoint."},
                ),
                "critic_lora": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Train the critic through LoRA too (fits smaller GPUs); off = full critic.",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(
        self,
        student,
        teacher,
        prompts,
        reward: str,
        steps: int,
        learning_rate: float,
        critic_learning_rate: float,
        batch_size: int,
        gradient_accumulation: int,
        beta: float,
        lora_rank: int,
        output_name: str,
        vae=None,
        decoder=None,
        reward_source: str = "",
        width: int = 832,
        height: int = 480,
        latent_frames: int = 21,
        seed: int = 0,
        save_every: int = 25,
        resume: bool = True,
        critic_lora: bool = True,
        unique_id: str | None = None,
    ):
        from rf_core.train.config import TrainConfig
        from rf_core.train.distributed import DistInfo
        from rf_core.train.plot import render_curves
        from rf_core.train.rewards import build_reward
        from rf_core.train.setup import stream_decoder
        from rf_core.train.trainer import PromptSet, ReDMDTrainer

        for name, handle in (("student", student), ("teacher", teacher)):
            if not isinstance(handle, RFModel):
                raise ValueError(
                    f"{name}: expected an RF_MODEL from 'Reward Forcing: Load Model', got {type(handle).__name__}"
                )
        if not isinstance(prompts, PromptSet):
            raise ValueError(
                f"prompts: expected an RF_PROMPT_LIST from Encode Prompt List, got {type(prompts).__name__}"
            )
        name = _safe_name(output_name)
        hw = latent_hw(width, height)
        run_dir = os.path.join(comfy.output_directory(), TRAIN_FOLDER, name)
        lora_path = os.path.join(_lora_folder(), f"{name}.safetensors")
        config = TrainConfig.from_dict(
            {
                "video": {"frames": latent_frames, "height": hw[0] * 8, "width": hw[1] * 8},
                "loss": {"beta": beta},
                "reward": {"kind": reward},
                "optim": {
                    "lr": learning_rate,
                    "lr_critic": critic_learning_rate,
                    "batch_size": batch_size,
                    "gradient_accumulation": gradient_accumulation,
                    "ema_start_step": steps // 3,
                },
                "lora": {
                    "enabled": True,
                    "rank": lora_rank,
                    "alpha": float(lora_rank),
                    "critic": critic_lora,
                },
                "run": {
                    "steps": steps,
                    "seed": seed,
                    "save_every": save_every,
                    "output_dir": run_dir,
                    "output_name": name,
                },
            },
            source="Re-DMD Train",
        )
        stream, _ = decoder_stream(vae, decoder)
        with torch.inference_mode(False), torch.enable_grad():
            # Copy the student while its weights (and any LoRA patches) are loaded, before loading the
            # teacher may offload it. Training runs where ComfyUI put it (or on the CPU for models
            # placed there).
            student_model = student.acquire()
            device = next(student_model.parameters()).device
            generator = _trainable_copy(student_model, device, "student")
            patchers = [teacher.managed.patcher]
            if stream is not None:
                patchers.append(
                    getattr(getattr(decoder, "managed", None), "patcher", None)
                    or getattr(vae, "patcher", None)
                )
            comfy.load_models([p for p in patchers if p is not None])
            teacher_model = teacher.acquire()
            if next(teacher_model.parameters()).device != device:
                raise ValueError(
                    f"the teacher is on {next(teacher_model.parameters()).device} but the student on {device}: "
                    "load both with the same placement"
                )
            critic = _trainable_copy(teacher_model, device, "teacher")
            if teacher_model.cfg.text_dim != generator.cfg.text_dim:
                raise ValueError(
                    f"teacher takes {teacher_model.cfg.text_dim}-wide text embeddings, the student "
                    f"{generator.cfg.text_dim}: use a Wan2.1 teacher with the same text encoder"
                )
            train_prompts = _fit_prompts(prompts, generator.cfg.text_dim, generator.cfg.text_len)
            options = _reward_options(reward, reward_source)
            reward_fn = build_reward(_reward_kind(reward, reward_source), options, device=device)
            decode = stream_decoder(lambda: decoder_stream(vae, decoder)[0]) if stream is not None else None
            trainer = ReDMDTrainer(
                config,
                generator,
                teacher_model,
                critic,
                train_prompts,
                reward=reward_fn,
                decoder=decode,
                dist=DistInfo(device=device),
                interrupt=comfy.interrupt_check(),
            )
            if resume:
                found = trainer.resume()
                if found is not None:
                    log.info("Re-DMD Train: resumed %s at step %d", found, trainer.step)
            progress = comfy.Progress(steps, unique_id)
            progress.update(trainer.step)
            trainer.train(on_step=lambda row: progress.update(trainer.step))
            path = trainer.export(lora_path)
            curves = torch.from_numpy(render_curves(trainer.history).astype(np.float32) / 255.0)[None]
            preview = _preview(trainer, train_prompts, hw, decode)
        rollouts = batch_size * gradient_accumulation
        return {
            "ui": {
                "text": [
                    f"trained {trainer.step} steps ({rollouts} rollout{'s' * (rollouts > 1)} per step), "
                    f"saved {os.path.basename(path)}"
                ]
            },
            "result": (str(path), curves, preview),
        }


def _safe_name(name: str) -> str:
    name = name.strip().removesuffix(".safetensors")
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ValueError(f"output_name {name!r} must be a plain file name such as 'redmd_lora'")
    return name


def _lora_folder() -> str:
    folders = comfy.model_folder_paths("loras")
    folder = folders[0] if folders else os.path.join(comfy.output_directory(), "loras")
    os.makedirs(folder, exist_ok=True)
    return folder


def _reward_kind(reward: str, source: str) -> str:
    if reward == "custom":
        if not source.strip():
            raise ValueError("reward 'custom' needs reward_source = 'package.module:callable'")
        return source.strip()
    return reward


def _reward_options(reward: str, source: str) -> dict:
    if reward == "videoalign":
        if not source.strip():
            raise ValueError("reward 'videoalign' needs reward_source = the VideoReward folder")
        return {"path": source.strip()}
    return {}


def _trainable_copy(model: WanDiT, device: torch.device, what: str) -> WanDiT:
    """A float32 copy whose weights are ordinary (non-inference) tensors on ``device``."""
    params = dict(model.named_parameters())
    if any(p.dtype not in (torch.float32, torch.bfloat16, torch.float16) for p in params.values()):
        raise ValueError(f"{what}: fp8-stored weights cannot be trained; load it with dtype bf16 or fp32")
    with torch.device("meta"):
        copy = WanDiT(model.cfg, attn_backend=model.attn_backend)
    copy.load_state_dict(
        {k: v.detach().to(device, torch.float32, copy=True) for k, v in params.items()}, assign=True
    )
    return copy


def _fit_prompts(prompts, text_dim: int, text_len: int):
    """The prompt list at the model's text length (zero rows cut or padded)."""
    from rf_core.train.trainer import PromptSet

    embeds, negative = prompts.batch(range(len(prompts))), prompts.negative
    if embeds.shape[-1] != text_dim:
        raise ValueError(
            f"prompts: embeddings are {embeds.shape[-1]} wide but the model takes {text_dim}: encode them with "
            f"the umT5 text encoder (CLIPLoader type 'wan')"
        )

    def fit(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2]
        if n > text_len:
            if x[..., text_len:, :].abs().amax() > 0:
                log.warning("Re-DMD Train: prompts longer than %d tokens are cut", text_len)
            return x[..., :text_len, :]
        return torch.nn.functional.pad(x, (0, 0, 0, text_len - n))

    return PromptSet(fit(embeds.float().clone()), fit(negative.float().clone()), list(prompts.texts))


@torch.no_grad()
def _preview(trainer, prompts, hw: tuple[int, int], decode) -> torch.Tensor:
    """One video of the trained student (first prompt, the inference sink policy) as IMAGE frames."""
    from rf_core.train.rollout import sample

    from ..stream.previews import latent_rgb

    dev = trainer.device
    latents = sample(
        trainer.generator,
        prompts.batch([0]).to(dev),
        hw,
        trainer.config.video.frames,
        trainer.config.run.seed,
    )
    frames = decode(latents) if decode is not None else latent_rgb(latents)
    return frames[0].permute(0, 2, 3, 1).float().clamp(0, 1).to(comfy.intermediate_device())


NODE_CLASS_MAPPINGS = {
    "RewardForcingEncodePromptList": RewardForcingEncodePromptList,
    "RewardForcingReDMDTrain": RewardForcingReDMDTrain,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardForcingEncodePromptList": "Reward Forcing: Encode Prompt List",
    "RewardForcingReDMDTrain": "Reward Forcing: Re-DMD Train",
}
