"""How the command line reports problems: one line each, ``reward-forcing <command>: error: ...``.

Commands raise ``CliError`` for what they check themselves; ``rf_core.cli.main`` turns it, and any
other exception, into one line and exit code 2 (``--debug`` adds the traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

PROG = "reward-forcing"


class CliError(Exception):
    """A problem with the user's input, reported as one line (exit code 2)."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. Exceptions of our own loaders carry whole sentences;
    others get their type named so that an unexpected failure still says what it was."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])  # str(KeyError) adds quotes
    elif isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"  # without "[Errno 2]"
    else:
        text = str(err)
    text = " ".join(text.split())
    if not isinstance(err, CliError | ValueError | OSError | KeyError):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text or type(err).__name__


def warning_line(command: str, message: str) -> str:
    """A one-line warning: the run goes on, but the user hears what was replaced or ignored."""
    return f"{PROG} {command}: warning: {' '.join(message.split())}"


def warn(command: str, message: str) -> None:
    print(warning_line(command, message), file=sys.stderr)


@contextmanager
def about(flag: str, value: object = None) -> Iterator[None]:
    """Prefix errors raised inside with the flag (or config key) and its value, so the line names
    what the user passed: ``--model x.pt: ...``. A message that starts with the value itself (as
    loaders' messages start with the file) is not prefixed twice."""
    try:
        yield
    except CliError:
        raise
    except (ValueError, OSError, KeyError) as e:
        text = one_line(e)
        if value is None:
            raise CliError(f"{flag}: {text}") from e
        raise CliError(f"{flag} {value}: {text.removeprefix(f'{value}: ')}") from e
