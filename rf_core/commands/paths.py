"""Input and output paths of the commands, checked before any work so that nothing is lost: an output
is never an input, never a folder where a file goes (or the reverse), replaces an existing file only
with --overwrite, and its folder exists or can be made and is writable."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rf_core.commands.errors import CliError

Inputs = Sequence[tuple[str, Path]]  # (where the user named it: "--model", "model.student"; the path)


def input_path(path: str, flag: str, what: str, *, folder_ok: bool = False, hint: str = "") -> Path:
    """An existing input file (or folder, where ``folder_ok``)."""
    p = Path(path).expanduser()
    hint = f"; {hint}" if hint else ""
    if not p.exists():
        raise CliError(f"{flag} {path}: {what} file not found{hint}")
    if p.is_dir() and not folder_ok:
        raise CliError(f"{flag} {path}: expected a {what} file, got a folder")
    return p


def same_file(a: Path, b: Path) -> bool:
    """True when both names reach one file (also through symlinks or hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def _refuse_inputs(out: Path, flag: str, raw: str, inputs: Inputs) -> None:
    for in_flag, p in inputs:
        if same_file(out, p):
            raise CliError(f"{flag} {raw}: is the {in_flag} file {p}; an input is never overwritten")


def check_folder_writable(folder: Path, flag: str, raw: str) -> None:
    """``folder`` exists as a writable folder, or can be made: its nearest existing ancestor is a
    writable folder, not a file."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"{flag} {raw}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {raw}: cannot write into {existing} (permission denied)")


def output_file(
    path: str, flag: str, *, suffix: str, inputs: Inputs, overwrite: bool, what: str = "file"
) -> Path:
    """A file to write: ``suffix`` as its extension, not a folder, not an input, existing only with
    ``overwrite``, and in a folder that is or can be made writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CliError(
            f"{flag} {path}: is a folder; expected a {suffix} {what} name such as {p / ('video' + suffix)}"
        )
    if p.suffix.lower() != suffix:
        raise CliError(f"{flag} {path}: expected a {suffix} {what} name, got {p.suffix or 'no extension'}")
    _refuse_inputs(p, flag, path, inputs)
    if os.path.lexists(p) and not overwrite:
        raise CliError(f"{flag} {path}: exists; pass --overwrite to replace it")
    check_folder_writable(p.parent, flag, path)
    return p


def output_folder(path: str, flag: str, *, inputs: Inputs) -> Path:
    """A folder to write files into: not an existing file, not an input, writable or creatable."""
    if not path.strip():
        raise CliError(f"{flag}: expected a folder name, got {path!r}")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CliError(f"{flag} {path}: is a file; expected a folder")
    _refuse_inputs(p, flag, path, inputs)
    check_folder_writable(p, flag, path)
    return p
