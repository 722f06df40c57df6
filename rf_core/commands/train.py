"""``reward-forcing train``: Re-DMD fine-tuning (full or LoRA) from a YAML/TOML config.

The config, the --set values, every file the config names, the device and the output folder are
checked before any model loads; each problem is one line naming the key.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from rf_core.commands import argtypes
from rf_core.commands.errors import CliError, about, one_line, warn
from rf_core.commands.paths import input_path, output_folder, same_file

COMMAND = "train"

DESCRIPTION = """\
Re-DMD fine-tuning of the Reward Forcing student, full weights or LoRA: the student rolls out videos,
a frozen teacher and a trained critic give the distribution-matching gradient, weighted by a reward.
Metrics, checkpoints, curves and the trained weights go to run.output_dir.
configs/train_default.yaml documents every key and holds the paper's values."""

EPILOG = """\
examples:
  # one GPU
  reward-forcing train --config configs/train_default.yaml
  # a LoRA, 100 steps, another output folder
  reward-forcing train --config configs/train_default.yaml --set lora.enabled=true --set run.steps=100 \\
      --set run.output_dir=runs/my_lora
  # continue from the newest checkpoint of run.output_dir (or give a checkpoint file)
  reward-forcing train --config configs/train_default.yaml --resume
  # many GPUs
  torchrun --nproc_per_node 8 -m rf_core.cli train --config configs/train_default.yaml"""

# Config keys that name files read by the run, and what each is (critic may also be "teacher" or "student").
INPUT_KEYS = {
    "model.student": "student checkpoint",
    "model.teacher": "teacher checkpoint",
    "model.critic": "critic checkpoint",
    "model.vae": "Wan VAE",
    "data.prompt_embeddings": "prompt-embedding",
    "data.prompts": "prompt list",
    "data.text_encoder": "umT5 text encoder",
    "data.tokenizer": "umT5 tokenizer",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        COMMAND,
        help="Re-DMD fine-tuning of the student (full weights or LoRA)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument(
        "--config", required=True, help="training config (.yaml/.yml/.toml), see configs/train_default.yaml"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="FILE",
        help="continue from the newest checkpoint in run.output_dir/checkpoints, or from FILE "
        "(default: start fresh)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set run.steps=100 --set lora.enabled=true; "
        "repeatable",
    )
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise CliError(f"--set: expected SECTION.KEY=VALUE (e.g. run.steps=100), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise CliError(f"--set {item}: the value is not valid YAML: {one_line(e)}") from None
    return out


def load_config(path: str, overrides: dict):
    """The config, read first alone and then with the --set values, so that an error names its source."""
    from rf_core.train.config import load_train_config

    input_path(path, "--config", "training config")
    try:
        config = load_train_config(path)
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"--config {path}: cannot read it: {one_line(e)}") from e
    if not overrides:
        return config
    try:
        return load_train_config(path, overrides)
    except ValueError as e:
        text = one_line(e).removeprefix(f"{path}: ")
        for key, value in overrides.items():
            section, name = key.split(".", 1)
            if key in text or f"unknown key {name!r}" in text or f"unknown section {section!r}" in text:
                raise CliError(f"--set {key}={value}: {text}") from e
        raise CliError(f"--config {path} with the --set values: {text}") from e


def check_config(config, args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Files, device and output folder; returns the run's input files."""
    values = {key: getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in INPUT_KEYS}
    if values["model.critic"] in ("teacher", "student"):
        values["model.critic"] = ""
    warnings = []
    if config.model.random_preset:
        unused = [k for k in ("model.student", "model.teacher", "model.critic") if values.pop(k)]
        if unused:
            warnings.append(f"model.random_preset is set, so {', '.join(unused)} not used")
    if config.data.prompt_embeddings and config.data.prompts:
        warnings.append("data.prompt_embeddings is given, so data.prompts is not used")
        values["data.prompts"] = ""
    inputs = [
        (
            key,
            input_path(
                value,
                key,
                INPUT_KEYS[key],
                folder_ok=key in ("model.student", "model.teacher", "model.critic", "data.tokenizer"),
            ),
        )
        for key, value in values.items()
        if value
    ]
    if config.run.device:
        try:
            argtypes.device(config.run.device)
        except argparse.ArgumentTypeError as e:
            raise CliError(f"run.device {config.run.device!r}: {e}") from None
    if args.resume not in (None, "latest"):
        inputs.append(("--resume", input_path(args.resume, "--resume", "training checkpoint")))
    inputs.append(("--config", Path(args.config)))
    out = output_folder(config.run.output_dir, "run.output_dir", inputs=inputs)
    export = out / f"{config.run.output_name}.safetensors"
    for key, path in inputs:
        if same_file(export, path):
            raise CliError(
                f"run.output_name {config.run.output_name!r}: the trained weights would go to {export}, "
                f"which is the {key} input; choose another run.output_dir or run.output_name"
            )
    for text in warnings:  # only once every check has passed: an error stays the only line
        warn(COMMAND, text)
    return inputs


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rf_core.train.distributed import destroy, init_distributed
    from rf_core.train.metrics import MetricsLog
    from rf_core.train.setup import build_trainer

    config = load_config(args.config, parse_overrides(args.set))
    inputs = check_config(config, args)
    dist = init_distributed(config.run.device or None)
    try:
        trainer = build_trainer(config, dist)
        if args.resume is not None:
            with about("--resume", args.resume):
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
            saved = out / "config.yaml"
            if any(same_file(saved, path) for _, path in inputs):
                warn(
                    COMMAND,
                    f"{saved} is the --config file; it is kept as it is (the --set values are not saved)",
                )
            else:
                saved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
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
