"""Resumable training checkpoints: one file per saved step, written atomically.

A checkpoint is a ``torch.save`` dict (read back with ``weights_only=True``) holding the step, the
trainable weights of generator and critic, both optimiser states, the EMA shadow, the global RNG
states and the run's config. It is written to ``<name>.tmp``, flushed to disk, then renamed over the
final name, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from rf_core.io.safe_load import torch_load

FORMAT = "reward-forcing/train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:07d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_atomic(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(state: dict, folder: str | Path, step: int, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the ``keep`` newest."""
    path = save_atomic(
        {"format": FORMAT, "version": VERSION, "step": step, **state}, checkpoint_path(folder, step)
    )
    for _, old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint not found: {path}")
    state = torch_load(path)  # weights_only; a damaged file raises an error naming it
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Reward Forcing training checkpoint (format {FORMAT!r} expected)")
    if state.get("version") != VERSION:
        raise ValueError(
            f"{path}: checkpoint version {state.get('version')}, this code reads version {VERSION}"
        )
    return state


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
