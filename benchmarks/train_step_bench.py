"""Re-DMD training step at full size with random weights: seconds per step and peak GPU memory.

One training step = one generator step (rollout of 21 latent frames at 480x832 with gradients through
each chunk's exit step, reward, critic + teacher with CFG, backward) and one critic step (rollout
without gradients, critic flow loss, backward), each followed by its AdamW step; the 1.3B teacher,
bf16 autocast, gradient checkpointing, batch 1, no accumulation, EMA on the CPU. The exit step is
fixed (default 3, all four denoising steps: the slowest and largest case). The motion reward runs on
the latents (no VAE). Prints one JSON object with a row per mode:

    lora             generator LoRA (rank 32) + critic LoRA  (the ComfyUI node's default)
    lora_full_critic generator LoRA + critic trained in full  (the CLI's lora.enabled default)
    full             generator and critic trained in full     (the paper's setting)

    python benchmarks/train_step_bench.py --modes lora,full --steps 2 --out train_bench.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_core.tiny import random_model, random_prompt  # noqa: E402
from rf_core.train.config import TrainConfig  # noqa: E402
from rf_core.train.rewards import MotionReward  # noqa: E402
from rf_core.train.trainer import PromptSet, ReDMDTrainer  # noqa: E402

MODES = {
    "lora": {"enabled": True, "critic": True},
    "lora_full_critic": {"enabled": True, "critic": False},
    "full": {"enabled": False, "critic": False},
}
GIB = 1024**3


def build(mode: str, args) -> ReDMDTrainer:
    cfg = TrainConfig.from_dict(
        {
            "model": {"attn_backend": args.attn},
            "video": {"frames": args.frames, "height": args.height, "width": args.width},
            "optim": {"gradient_accumulation": 1, "critic_steps_per_generator": 1, "ema_start_step": 0},
            "lora": {**MODES[mode], "rank": args.rank, "alpha": float(args.rank)},
            "run": {
                "steps": 10**6,
                "save_every": 10**6,
                "output_dir": "/tmp/rf_train_bench",
                "device": "cuda",
            },
        }
    )
    preset = args.preset
    gen = random_model(preset, seed=1, device="cuda", attn_backend=args.attn)
    teacher = random_model(preset, seed=2, device="cuda", dtype=torch.bfloat16, attn_backend=args.attn)
    critic = random_model(preset, seed=2, device="cuda", attn_backend=args.attn)
    prompts = PromptSet(random_prompt(preset, batch=4, seed=3), random_prompt(preset, seed=4)[0])
    trainer = ReDMDTrainer(cfg, gen, teacher, critic, prompts, reward=MotionReward())
    trainer._exit_step = lambda phase, micro: args.exit_step  # fixed exit step for comparable timings
    return trainer


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def run_mode(mode: str, args) -> dict:
    torch.cuda.reset_peak_memory_stats()
    try:
        return measure(mode, args)
    except torch.cuda.OutOfMemoryError as err:
        return {"mode": mode, "oom": True, "error": str(err).splitlines()[0]}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def measure(mode: str, args) -> dict:
    trainer = build(mode, args)
    weights_gib = torch.cuda.memory_allocated() / GIB
    trainer.train_step()  # warm-up: optimiser state, EMA, kernels
    gen_s, critic_s, total_s = [], [], []
    for _ in range(args.steps):
        g = timed(trainer._generator_phase)
        c = timed(trainer._critic_phase)
        trainer.step += 1
        gen_s.append(g)
        critic_s.append(c)
        total_s.append(g + c)
    peak = torch.cuda.max_memory_allocated() / GIB
    reserved = torch.cuda.max_memory_reserved() / GIB
    row = {
        "mode": mode,
        "seconds_per_step": statistics.median(total_s),
        "generator_phase_s": statistics.median(gen_s),
        "critic_phase_s": statistics.median(critic_s),
        "peak_allocated_gib": round(peak, 2),
        "peak_reserved_gib": round(reserved, 2),
        "weights_and_copies_gib": round(weights_gib, 2),
        "trainable_params_generator": sum(p.numel() for p in trainer.gen_params.values()),
        "trainable_params_critic": sum(p.numel() for p in trainer.critic_params.values()),
        "fits_gib": {str(g): reserved < g * 0.95 for g in (24, 48, 80)},
    }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="lora,lora_full_critic,full", help=f"comma list of {sorted(MODES)}")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--exit-step", type=int, default=3)
    p.add_argument("--attn", default="auto")
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", help="model size (teacher = student size)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_step_bench needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "setup": {
            k: getattr(args, k)
            for k in ("preset", "frames", "height", "width", "rank", "exit_step", "attn", "steps")
        },
        "rows": [run_mode(m.strip(), args) for m in args.modes.split(",") if m.strip()],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
