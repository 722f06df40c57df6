"""``reward-forcing convert``: any supported DiT checkpoint -> one clean safetensors file.

Output keys are Wan2.1's own names (loadable by us, by ComfyUI's UNETLoader and by Wan's code),
one dtype, float8 dequantised, LoRAs merged, with metadata naming the source layout and the config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rf_core.io.checkpoints import DitCheckpoint, open_dit_checkpoint, save_dit
from rf_core.io.safe_load import CheckpointError

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


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a DiT checkpoint to a canonical safetensors file")
    p.add_argument("input", help="checkpoint file, Wan/diffusers model folder, or *.safetensors.index.json")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="output dtype (default: the file's)")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="input layout (default: detect)")
    p.add_argument("--section", default=None, help="nested entry to read, e.g. generator or generator_ema")
    p.add_argument("--no-ema", action="store_true", help="prefer 'generator' over 'generator_ema'")
    p.add_argument("--preset", default=None, help="require this model preset (error if the file differs)")
    p.add_argument("--lora", action="append", default=[], help="LoRA file to merge (repeatable)")
    p.add_argument(
        "--lora-strength",
        action="append",
        type=float,
        default=[],
        help="strength per --lora, in order (one value applies to all; default 1.0)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def lora_specs(loras: list[str], strengths: list[float]) -> list[tuple[str, float]]:
    if not strengths:
        strengths = [1.0] * len(loras)
    elif len(strengths) == 1:
        strengths = strengths * len(loras)
    if len(strengths) != len(loras):
        raise SystemExit(f"convert: got {len(loras)} --lora but {len(strengths)} --lora-strength values")
    return list(zip(loras, strengths))


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise SystemExit(f"convert: the output must be a .safetensors file, got {out}")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"convert: {out} exists (pass --overwrite to replace it)")
    if out.resolve() == Path(args.input).resolve():
        raise SystemExit("convert: the output must not be the input file")
    try:
        ckpt = open_dit_checkpoint(
            args.input,
            format=args.format,
            prefer_ema=not args.no_ema,
            section=args.section,
            preset=args.preset,
        )
        dtype = DTYPES[args.dtype] if args.dtype else ckpt.file_dtype
        describe(ckpt)
        save_dit(out, ckpt, dtype=dtype, loras=lora_specs(args.lora, args.lora_strength))
    except CheckpointError as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB, {str(dtype).removeprefix('torch.')})",
        file=sys.stderr,
    )
    return 0


def describe(ckpt: DitCheckpoint) -> None:
    info, cfg = ckpt.info, ckpt.config
    print(
        f"read {len(ckpt.keys)} tensors, layout {info.format}"
        + (f", section {info.section}" if info.section else "")
        + (f", {info.quantization}" if info.quantization else "")
        + f"; model {cfg.num_layers} blocks x {cfg.dim} (config from {info.config_source})",
        file=sys.stderr,
    )
