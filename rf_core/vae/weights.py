"""Reading decoder checkpoints (.pth / .safetensors) safely and checking them against a module."""

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the module it is loaded into."""


def read_state_dict(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` or ``.safetensors`` file, converted one by one to ``device``/``dtype``.

    ``.pth`` files load with ``weights_only=True`` (no code from the pickle ever runs) and
    memory-mapped where the file format allows, so that converting tensor by tensor never holds
    the whole file twice. ``keep(key)``, if given, selects the tensors to return; the others are
    dropped without being converted.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")

    def convert(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device) if device is not None else t

    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: convert(f.get_tensor(k)) for k in f.keys() if keep is None or keep(k)}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e

    raw = _torch_load(path)
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(raw).__name__}"
        )
    out = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if keep is None or keep(k):
            out[k] = convert(v)
    return out


def _torch_load(path: Path):
    def refused(e: Exception) -> CheckpointError:
        return CheckpointError(
            f"{path}: refused to load: the pickle holds more than plain tensors (weights_only=True: {e})"
        )

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise refused(e) from e
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from e
    # Files written in the legacy (non-zip) format cannot be memory-mapped: load them whole.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused(e) from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from e


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing every missing/unexpected key and shape mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"  {k}: expected {list(expected[k].shape)}, got {list(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{source}: checkpoint does not match {type(module).__name__}"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
    if wrong:
        parts.append(f"shape mismatches ({len(wrong)}):\n" + "\n".join(wrong[:20]))
    raise CheckpointError("\n".join(parts))


def _shorten(keys: list[str], limit: int = 20) -> str:
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def assign_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Check, then make the module's parameters *be* the given tensors (no copy).

    Meant for a module built on the meta device, so that the weights exist in memory once.
    """
    check_state_dict(module, state_dict, source)
    module.load_state_dict(state_dict, strict=True, assign=True)
