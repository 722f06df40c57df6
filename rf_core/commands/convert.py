"""``reward-forcing convert``: any supported DiT checkpoint -> one clean safetensors file.

Output keys are Wan2.1's own names (loadable by us, by ComfyUI's UNETLoader and by Wan's code),
one dtype, float8 dequantised, LoRAs merged, with metadata naming the source layout and the config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rf_core.commands import argtypes
from rf_core.commands.errors import CliError, about, warn
from rf_core.commands.paths import input_path, output_file
from rf_core.config import PRESETS
from rf_core.io.checkpoints import DitCheckpoint, open_dit_checkpoint, save_dit
from rf_core.lora import load_lora, lora_param_deltas

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMAT_CHOICES = (
    "auto",
    "wan",
    "training",
    "rewardforcing",
    "self-forcing",
    "longlive",
    "comfyui",
    "diffusers",
)

EPILOG = """\
examples:
  reward-forcing convert models/Reward-Forcing-T2V-1.3B/rewardforcing.pt models/rewardforcing_bf16.safetensors --dtype bf16
  reward-forcing convert models/Wan2.1-T2V-1.3B models/wan_1.3b.safetensors
  reward-forcing convert models/Reward-Forcing-T2V-1.3B/rewardforcing.pt merged.safetensors --lora a.safetensors --lora b.safetensors \\
      --lora-strength 0.8 --lora-strength 0.5

The output is written to a temporary file next to it and renamed when complete; its folder is made if
missing. An existing output is replaced only with --overwrite; an input file never is."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a DiT checkpoint to a canonical safetensors file",
        description="Convert any supported DiT checkpoint (or model folder) to one canonical safetensors\n"
        "file: Wan2.1 key names, one dtype, float8 dequantised, LoRAs merged, metadata.",
        epilog=EPILOG,
    )
    p.add_argument("input", help="checkpoint file, Wan/diffusers model folder, or *.safetensors.index.json")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the file's)")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="input layout (auto: detect)")
    p.add_argument(
        "--section", help="nested entry to read, e.g. generator or generator_ema (default: detect)"
    )
    p.add_argument("--no-ema", action="store_true", help="prefer 'generator' over 'generator_ema'")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="require this model preset (error if the file differs)"
    )
    p.add_argument(
        "--lora", action="append", default=[], metavar="FILE", help="LoRA file to merge; repeatable"
    )
    p.add_argument(
        "--lora-strength",
        action="append",
        type=argtypes.lora_strength,
        default=[],
        metavar="S",
        help="strength per --lora, in order; one value applies to all (default: 1.0)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def lora_specs(loras: list[str], strengths: list[float]) -> list[tuple[str, float]]:
    if strengths and not loras:
        raise CliError(f"--lora-strength {strengths[0]:g}: given without --lora (there is nothing to merge)")
    if not strengths:
        strengths = [1.0] * len(loras)
    elif len(strengths) == 1:
        strengths = strengths * len(loras)
    if len(strengths) != len(loras):
        raise CliError(
            f"--lora-strength: expected one value, or one per --lora ({len(loras)}), got {len(strengths)}"
        )
    return list(zip(loras, strengths))


def run(args: argparse.Namespace) -> int:
    loras = lora_specs(args.lora, args.lora_strength)
    inputs = [("input", input_path(args.input, "input", "checkpoint", folder_ok=True))]
    inputs += [("--lora", input_path(path, "--lora", "LoRA")) for path, _ in loras]
    out = output_file(args.output, "output", suffix=".safetensors", inputs=inputs, overwrite=args.overwrite)
    read = []
    for path, strength in loras:  # small files, read before the checkpoint
        with about("--lora", path):
            read.append((load_lora(path), strength))
    with about("input", args.input):
        ckpt = open_dit_checkpoint(
            args.input,
            format=args.format,
            prefer_ema=not args.no_ema,
            section=args.section,
            preset=args.preset,
        )
    # a sharded checkpoint or a model folder reads files the user did not name: none may be the output
    output_file(
        args.output,
        "output",
        suffix=".safetensors",
        inputs=[("input", Path(p)) for p in ckpt.info.paths],
        overwrite=args.overwrite,
    )
    shapes = {k: t.shape for k, t in ckpt.canonical.weights.items()}
    for (path, _), (lora, _) in zip(loras, read):  # each LoRA fits this model, before anything is written
        with about("--lora", path):
            lora_param_deltas(lora, shapes)
    if args.no_ema and (text := no_ema_unused(args.input, ckpt.info.section)):
        warn("convert", text)
    dtype = DTYPES[args.dtype] if args.dtype else ckpt.file_dtype
    describe(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_dit(out, ckpt, dtype=dtype, loras=read, overwrite=args.overwrite)
    print(
        f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB, {str(dtype).removeprefix('torch.')})",
        file=sys.stderr,
    )
    return 0


def no_ema_unused(path: str, section: str | None) -> str | None:
    """The warning for --no-ema when the weights read are not a 'generator' section (the file has
    none to prefer over generator_ema), else None."""
    if "generator" in (section or "").split("/"):
        return None
    return f"--no-ema is not used: {path} has no 'generator' section (read: {section or 'the top level'})"


def describe(ckpt: DitCheckpoint) -> None:
    info, cfg = ckpt.info, ckpt.config
    print(
        f"read {len(ckpt.keys)} tensors, layout {info.format}"
        + (f", section {info.section}" if info.section else "")
        + (f", {info.quantization}" if info.quantization else "")
        + f"; model {cfg.num_layers} blocks x {cfg.dim} (config from {info.config_source})",
        file=sys.stderr,
    )
