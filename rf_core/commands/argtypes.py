"""Argument types for the command line: each checks its value when the arguments are parsed, so a bad
value ends the run before anything is loaded, with argparse's one line naming the flag."""

from __future__ import annotations

import math
from argparse import ArgumentTypeError

import torch


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def frame_rate(text: str) -> float:
    value = _number(text, float)
    if not 0.1 <= value <= 240:
        raise ArgumentTypeError(f"expected a frame rate in [0.1, 240] frames per second, got {text!r}")
    return value


def unit_float(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


# The largest width or height, as in the nodes' size widgets: the model was trained at 832x480, and
# far larger sizes only fail later, in the middle of a run, for want of memory.
MAX_VIDEO_SIZE = 4096
# A LoRA strength's range, as in ComfyUI's LoRA loader; far beyond it the video is garbage (1e30: black).
MAX_LORA_STRENGTH = 100.0


def video_size(text: str) -> int:
    """A width or height: the VAE downsamples by 8 and the DiT patches by 2, so multiples of 16."""
    value = _number(text, int)
    if value < 16 or value % 16:
        raise ArgumentTypeError(f"expected a positive multiple of 16 (e.g. 832, 480), got {text!r}")
    if value > MAX_VIDEO_SIZE:
        raise ArgumentTypeError(
            f"expected at most {MAX_VIDEO_SIZE} (the model was trained at 832x480), got {text!r}"
        )
    return value


def seed(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < 2**63:
        raise ArgumentTypeError(f"expected a whole number in [0, 2**63), got {text!r}")
    return value


def timesteps(text: str) -> tuple[float, ...]:
    """Comma-separated denoising timesteps in (0, 1000], from high to low, e.g. ``1000,750,500,250``."""
    try:
        steps = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ArgumentTypeError(
            f"expected comma-separated numbers like 1000,750,500,250, got {text!r}"
        ) from None
    if not all(math.isfinite(t) and 0 < t <= 1000 for t in steps):
        raise ArgumentTypeError(f"expected timesteps in (0, 1000], got {text!r}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ArgumentTypeError(f"expected timesteps from high to low (denoising order), got {text!r}")
    return steps


def lora_strength(text: str) -> float:
    value = _number(text, float)
    if abs(value) > MAX_LORA_STRENGTH:
        raise ArgumentTypeError(
            f"expected a strength in [-{MAX_LORA_STRENGTH:g}, {MAX_LORA_STRENGTH:g}], got {text!r}"
        )
    return value


def lora_spec(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:STRENGTH``. Only a number after the last colon is a strength, so paths with
    colons (``C:\\loras\\x.safetensors``) stay whole."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            float(tail)
        except ValueError:
            path, strength = text, 1.0
        else:
            strength = lora_strength(tail)
    else:
        path, strength = text, 1.0
    if not path:
        raise ArgumentTypeError(f"expected FILE or FILE:STRENGTH, got {text!r}")
    return path, strength


def device(text: str) -> torch.device:
    """cpu, cuda, cuda:N or mps, and only one this machine has."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ArgumentTypeError(f"CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentTypeError(
                f"got {text!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ArgumentTypeError("MPS (Apple GPU) is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_backend(text: str) -> str:
    """A known backend whose package is importable (rf_core.model.attention)."""
    from rf_core.model.attention import BACKENDS, check_backend

    if text not in BACKENDS:
        raise ArgumentTypeError(f"expected one of {', '.join(BACKENDS)}, got {text!r}")
    try:
        return check_backend(text)
    except ValueError as e:
        raise ArgumentTypeError(str(e)) from None
