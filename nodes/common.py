"""Shared node settings: category, widget specs, and the checks that turn widget values into engine inputs."""

from __future__ import annotations

import math

import torch

from rf_core import timeline
from rf_core.config import DiTConfig, StreamConfig

CATEGORY = "Reward Forcing"
WAN_FPS = 16.0
SIZE_MULTIPLE = 16  # 8x VAE downsampling times the DiT's 2x2 patches
MAX_SIZE = 4096


def size_widget(default: int, what: str) -> tuple:
    return (
        "INT",
        {
            "default": default,
            "min": SIZE_MULTIPLE,
            "max": MAX_SIZE,
            "step": SIZE_MULTIPLE,
            "tooltip": f"Video {what} in pixels, a multiple of {SIZE_MULTIPLE} (the model was trained at 832x480).",
        },
    )


def steps_widget() -> tuple:
    return (
        "INT",
        {
            "default": 4,
            "min": 1,
            "max": 8,
            "tooltip": "Denoising steps per chunk. The distilled model was trained for 4 "
            "(timesteps 1000, 750, 500, 250); other counts space the steps evenly.",
        },
    )


def seed_widget(tooltip: str) -> tuple:
    return (
        "INT",
        {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": True, "tooltip": tooltip},
    )


class InputError(ValueError):
    """A bad widget value, refused when the prompt is queued.

    ``VALIDATE_INPUTS`` raises it rather than returning the message: ComfyUI files a returned message
    under every input that ``VALIDATE_INPUTS`` names (one bad width came back three times, under
    width, height and length), while an exception is reported once, for the node.
    """


def refuse(*errors: str | None) -> bool:
    """What ``VALIDATE_INPUTS`` ends with: True when every check passed (each gave None), else an
    ``InputError`` holding the messages of the failed ones, each naming its input."""
    found = [e for e in errors if e]
    if found:
        raise InputError("; ".join(found))
    return True


def check_size(width: int | None, height: int | None) -> str | None:
    """An error message for a video size the model cannot take, else None (None values: linked inputs)."""
    errors = []
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            down = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            errors.append(
                f"{name} {value} is not a positive multiple of {SIZE_MULTIPLE}: "
                f"use {down} or {down + SIZE_MULTIPLE}"
            )
        elif value > MAX_SIZE:
            errors.append(f"{name} {value} is more than {MAX_SIZE}")
    return "; ".join(errors) or None


def check_length(length: float | None) -> str | None:
    if length is not None and not length > 0:
        return f"length must be more than 0, got {length}"
    return None


def latent_hw(width: int, height: int) -> tuple[int, int]:
    error = check_size(width, height)
    if error:
        raise ValueError(error)
    return height // 8, width // 8


def denoise_steps(steps: int) -> tuple[float, ...]:
    """``steps`` evenly spaced integer timesteps from 1000 down: 4 -> (1000, 750, 500, 250)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return tuple(float(round(1000 * (steps - i) / steps)) for i in range(steps))


def requested_frames(length: float, unit: str, fps: float = WAN_FPS) -> int:
    """Video frames a length asks for, counting a started frame as a whole one."""
    error = check_length(length)
    if error:
        raise ValueError(error)
    if unit == "seconds":
        wanted = length * fps
    elif unit == "frames":
        wanted = length
    else:
        raise ValueError(f"length unit must be 'seconds' or 'frames', got {unit!r}")
    return math.ceil(round(wanted, 6))  # round() first: 0.3 s at 10 fps is 3.0000000000000004 frames


def latent_frames_for(
    length: float, unit: str, chunk_frames: int, fps: float = WAN_FPS, prefix: int = 0
) -> int:
    """Latent frames of the shortest whole-chunk video at least ``length`` long (never shorter).

    A video of T latent frames has 1 + 4 (T - 1) frames: 5 s at 16 fps (80 frames) -> 21 latent
    frames (81 frames); 10 frames -> 6 (21 frames); 477 frames -> 120, the reference's 30 s setting.
    After a prefix of ``prefix`` latent frames (a start image or a video to extend), ``length`` is that
    of the new video, 4 frames per latent frame: 5 s -> 21 latent frames (84 frames).
    """
    return timeline.latent_frames_for(requested_frames(length, unit, fps), chunk_frames, prefix)


def video_frames(latent_frames: int) -> int:
    """Frames the Wan VAE decodes from ``latent_frames`` latent frames (the first one gives one frame)."""
    return 1 + 4 * (latent_frames - 1)


def length_text(
    latent_frames: int, fps: float, requested: int | None = None, batch: int = 1, prefix: int = 0
) -> str:
    """The node's line about the video it makes, e.g. "21 frames (1.31 s at 16 fps); 10 frames asked,
    rounded up to whole chunks", or after a prefix of ``prefix`` latent frames "33 input frames + 84 new:
    117 frames (7.31 s at 16 fps)"."""
    opening = video_frames(prefix) if prefix else 0
    new = video_frames(latent_frames) if not prefix else 4 * latent_frames
    frames = opening + new
    text = f"{frames} frames ({frames / fps:.2f} s at {fps:g} fps)"
    if prefix:
        text = f"{opening} input frame{'s' * (opening > 1)} + {new} new: {text}"
    if batch > 1:
        text = f"{batch} videos of {text}"
    if requested is not None and requested < new:
        text += f"; {requested} {'new ' * bool(prefix)}frames asked, rounded up to whole chunks"
    return text


def stream_state_bytes(cfg: DiTConfig, config: StreamConfig, hw: tuple[int, int], batch: int, dtype) -> int:
    """Rough GPU memory of a stream's KV cache (keys, values and roped keys), for ComfyUI's manager."""
    pt, ph, pw = cfg.patch_size
    tokens = config.cache_frames * (hw[0] // ph) * (hw[1] // pw)
    size = torch.empty((), dtype=dtype).element_size()
    return 3 * cfg.num_layers * batch * tokens * cfg.dim * size


def model_input() -> tuple:
    """The RF_MODEL input of the streaming nodes."""
    return ("RF_MODEL", {"tooltip": "Model from Reward Forcing: Load Model (or LoRA)."})


def stream_settings_input() -> tuple:
    """The optional RF_STREAM_CONFIG input of the streaming nodes."""
    return ("RF_STREAM_CONFIG", {"tooltip": "EMA-Sink settings (default: Reward Forcing's)."})


def recache_widget(event: str) -> tuple:
    """The re-cache toggle; ``event`` names a new prompt's arrival in the node's words ("change", "switch")."""
    return (
        "BOOLEAN",
        {
            "default": True,
            "tooltip": f"On a prompt {event}, re-encode the recent frames under the new prompt "
            "(LongLive-style, smoother switch); off: only new chunks see the new prompt.",
        },
    )


def fps_widget(tooltip: str) -> tuple:
    return ("FLOAT", {"default": WAN_FPS, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip": tooltip})


def has_triton() -> bool:
    """torch.compile's GPU backend needs Triton (often missing on Windows installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def batch_widget() -> tuple:
    return (
        "INT",
        {
            "default": 1,
            "min": 1,
            "max": 64,
            "tooltip": "Videos per prompt, made together; video i uses seed + i, so each equals a batch-1 run "
            "with that seed. The IMAGE output holds the videos one after another.",
        },
    )


def comfy_vae_input(what: str) -> tuple:
    """The optional ``vae`` input (ComfyUI's Load VAE) of the nodes that decode."""
    return (
        "VAE",
        {
            "tooltip": f"ComfyUI's Wan 2.1 VAE (Load VAE): {what} On CUDA with Triton it is decoded by the "
            "pack's compiled Wan decoder with a copy of this VAE's weights (about 114 ms per 12 frames on an "
            "H100, against about 211 ms eager); elsewhere by ComfyUI's own decoder. Same frames within "
            "bf16 rounding either way.",
        },
    )
