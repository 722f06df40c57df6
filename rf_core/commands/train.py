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
from rf_core.train.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint

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
        "--overwrite",
        action="store_true",
        help="start afresh in a run.output_dir that holds an earlier run, deleting its checkpoints and "
        "metrics (without it, such a folder is refused unless --resume continues the run)",
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
            hint = str(e).replace("use --device cpu", "set run.device: cpu")
            raise CliError(f"run.device {config.run.device!r}: {hint}") from None
    if args.resume not in (None, "latest"):
        inputs.append(("--resume", input_path(args.resume, "--resume", "training checkpoint")))
        with about("--resume", args.resume):  # a bad file fails now, not after the models load
            load_checkpoint(args.resume)
    inputs.append(("--config", Path(args.config)))
    out = output_folder(config.run.output_dir, "run.output_dir", inputs=inputs)
    export = out / f"{config.run.output_name}.safetensors"
    for key, path in inputs:
        if same_file(export, path):
            raise CliError(
                f"run.output_name {config.run.output_name!r}: the trained weights would go to {export}, "
                f"which is the {key} input; choose another run.output_dir or run.output_name"
            )
    earlier = earlier_run(out, export)
    if earlier and args.resume is None and not args.overwrite:
        raise CliError(
            f"run.output_dir {config.run.output_dir}: holds an earlier run ({earlier}); pass --resume to "
            "continue it, --overwrite to start afresh there, or choose another run.output_dir"
        )
    warnings += unused_settings(config)
    for text in warnings:  # only once every check has passed: an error stays the only line
        warn(COMMAND, text)
    return inputs


def _build(config, dist):
    """The trainer; a failure while loading names the config key of the file it came from (the
    loaders' messages start with the file)."""
    from rf_core.train.setup import build_trainer

    try:
        return build_trainer(config, dist)
    except (ValueError, OSError) as e:
        text = one_line(e)
        for key in INPUT_KEYS:
            value = getattr(getattr(config, key.split(".")[0]), key.split(".")[1])
            if value and any(text.startswith(f"{name}:") for name in (value, str(Path(value)))):
                raise CliError(f"{key} {text}") from e
        raise


def earlier_run(out: Path, export: Path) -> str:
    """What an earlier run left in ``out`` (its newest checkpoint, metrics or weights), or ''."""
    found = [latest_checkpoint(out / "checkpoints"), out / "metrics.csv", export]
    return next((str(p) for p in found if p is not None and p.exists()), "")


def unused_settings(config) -> list[str]:
    """Warnings for config values that the run does not use: LoRA settings with lora.enabled false,
    reward options with no reward. Only values that differ from the defaults are named."""
    from rf_core.train.config import LoraConfig

    out = []
    if not config.lora.enabled:
        default = LoraConfig()
        changed = [
            f"lora.{k}"
            for k in ("rank", "alpha", "targets", "critic")
            if getattr(config.lora, k) != getattr(default, k)
        ]
        if changed:
            out.append(f"{', '.join(changed)} not used: lora.enabled is false (full fine-tuning)")
    if config.reward.kind == "none" and config.reward.options:
        out.append(f"reward.options {sorted(config.reward.options)} not used: reward.kind is none")
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rf_core.train.distributed import destroy, init_distributed
    from rf_core.train.metrics import MetricsLog

    config = load_config(args.config, parse_overrides(args.set))
    inputs = check_config(config, args)
    dist = init_distributed(config.run.device or None)
    try:
        trainer = _build(config, dist)
        if args.resume is not None:
            with about("--resume", args.resume):
                path = trainer.resume(None if args.resume == "latest" else args.resume)
            if dist.is_main:
                print(
                    f"resumed from {path} at step {trainer.step}"
                    if path
                    else "no checkpoint yet: starting fresh"
                )
            if path and trainer.step >= config.run.steps and dist.is_main:
                warn(
                    COMMAND,
                    f"run.steps {config.run.steps}: the checkpoint is at step {trainer.step} already, so "
                    "nothing is trained; the weights are exported as they are (raise run.steps to go on)",
                )
        out = Path(config.run.output_dir)
        log = None
        if dist.is_main:
            if args.overwrite and args.resume is None:  # start afresh: the earlier run's steps go
                for _, old in list_checkpoints(out / "checkpoints"):
                    old.unlink()
                (out / "metrics.csv").unlink(missing_ok=True)
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
