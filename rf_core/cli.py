"""The ``reward-forcing`` command line: one sub-command per module in ``rf_core/commands``, each with a
``register(subparsers)`` that adds its parser and sets ``func``. Every failure is one line
``reward-forcing <command>: error: ...`` and exit code 2; ``--debug`` adds the traceback."""

from __future__ import annotations

import argparse
import sys
import traceback
from importlib import import_module

from rf_core.commands.errors import PROG, CliError, one_line

COMMANDS: tuple[str, ...] = ("generate", "convert", "download", "train")

DESCRIPTION = """\
Real-time streaming text-to-video with Reward Forcing (a 4-step causal Wan2.1-1.3B student).
Run `reward-forcing <command> --help` for a command's flags and examples."""

EPILOG = """\
examples:
  reward-forcing generate --model tiny-random --prompt "a red fox running through snow" --seconds 2 --out out/video.mp4
  reward-forcing download --dir models
  reward-forcing convert models/Reward-Forcing-T2V-1.3B/rewardforcing.pt models/rewardforcing_bf16.safetensors --dtype bf16
  reward-forcing train --config configs/train_default.yaml

Errors are one line and exit with code 2; add --debug to see the traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written and shows every flag's default, unless its help
    already says it (where the default depends on other flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None or action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad argument as one line (no usage block) by raising, so ``main`` ends every
    failure the same way and callers in-process get the exit code back instead of SystemExit."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(self.prog, message)


class UsageError(CliError):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


def add_debug_flag(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show the traceback of an error (default: off)"
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    add_debug_flag(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in COMMANDS:
        import_module(f"rf_core.commands.{name}").register(sub)
    for command in sub.choices.values():
        # SUPPRESS: `reward-forcing --debug generate` is not undone by the sub-command's default
        add_debug_flag(command, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 done, 2 error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog, debug = PROG, "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        prog, debug = f"{PROG} {args.command}", args.debug
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"{e.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
