"""Files that appear whole: written under a name unique to this run, then moved onto the target.

The partial name keeps the target's stem and suffix and adds this process's id and a random token
(``video.4711-9f3c2a.partial.mp4``), so two runs writing the same target never share a partial file,
and a file left by a hard kill still says what it is and plays or loads under its own name.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def partial_path(target: str | os.PathLike, default_suffix: str = "") -> Path:
    """A fresh partial-file name next to ``target``, unique to this process and call."""
    target = Path(target)
    token = f"{os.getpid()}-{secrets.token_hex(3)}"
    return target.with_name(f"{target.stem}.{token}.partial{target.suffix or default_suffix}")


def publish(partial: str | os.PathLike, target: str | os.PathLike, overwrite: bool = True) -> None:
    """Move a finished partial file onto ``target`` in one step.

    overwrite=False refuses (FileExistsError, the partial file kept) when ``target`` exists by now,
    e.g. made by another run meanwhile: a hard link is created only if the name is free, so the check
    and the move cannot be split by another process.
    """
    partial, target = Path(partial), Path(target)
    if overwrite:
        os.replace(partial, target)
        return
    taken = FileExistsError(
        f"{target} appeared while this run was writing it and was not replaced; "
        f"this run's output is in {partial}"
    )
    try:
        os.link(partial, target)
    except FileExistsError:
        raise taken from None
    except OSError:  # a file system without hard links: check, then move
        if target.exists():
            raise taken from None
        os.replace(partial, target)
        return
    partial.unlink()
