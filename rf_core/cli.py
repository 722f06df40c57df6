"""``reward-forcing`` command line: one sub-command per module in ``rf_core/commands``."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# Each module defines ``register(subparsers)`` which adds its parser and sets ``func``.
COMMANDS: tuple[str, ...] = ("generate", "convert", "download", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reward-forcing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        import_module(f"rf_core.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
