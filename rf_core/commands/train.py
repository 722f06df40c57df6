"""``reward-forcing train``: Re-DMD fine-tuning (full or LoRA) from a YAML/TOML config.

One GPU:   reward-forcing train --config configs/train_default.yaml
Many GPUs: torchrun --nproc_per_node 8 -m rf_core.cli train --config configs/train_default.yaml
Continue:  the same command with --resume (newest checkpoint of run.output_dir) or --resume FILE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="Re-DMD fine-tuning of the student (full weights or LoRA)")
    p.add_argument(
        "--config", required=True, help="training config (.yaml/.yml/.toml), see configs/train_default.yaml"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the newest checkpoint in run.output_dir/checkpoints, or from the given file",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set run.steps=100 --set lora.enabled=true",
    )
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"train: --set expects SECTION.KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rf_core.train.config import load_train_config
    from rf_core.train.distributed import destroy, init_distributed
    from rf_core.train.metrics import MetricsLog
    from rf_core.train.setup import build_trainer

    config = load_train_config(args.config, parse_overrides(args.set))
    dist = init_distributed(config.run.device or None)
    try:
        trainer = build_trainer(config, dist)
        if args.resume is not None:
            path = trainer.resume(None if args.resume == "latest" else args.resume)
            if dist.is_main:
                print(
                    f"resumed from {path} at step {trainer.step}"
                    if path
                    else "no checkpoint yet: starting fresh"
                )
        out = Path(config.run.output_dir)
        log = None
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(
                yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8"
            )
            log = MetricsLog(out, tensorboard=config.run.tensorboard, resume_step=trainer.step)
        bar = tqdm(total=config.run.steps, initial=trainer.step, disable=not dist.is_main, unit="step")

        def on_step(row: dict) -> None:
            if log is not None:
                log.write(row)
            shown = {
                k: f"{row[k]:.4g}"
                for k in ("generator_loss", "critic_loss", "reward")
                if row.get(k) is not None
            }
            bar.set_postfix(shown, refresh=False)
            bar.update(1)

        try:
            trainer.train(on_step=on_step)
        finally:
            bar.close()
            if log is not None:
                log.close()
        path = trainer.export()
        if dist.is_main:
            from PIL import Image

            from rf_core.train.plot import render_curves

            Image.fromarray(render_curves(trainer.history)).save(out / "curves.png")
            print(f"wrote {path} (metrics: {out / 'metrics.csv'}, curves: {out / 'curves.png'})")
        return 0
    finally:
        destroy(dist)
