"""Shared node settings: category, widget specs, and the checks that turn widget values into engine inputs."""

from __future__ import annotations

import torch

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


def check_size(width: int, height: int) -> str | None:
    """An error message for a video size the model cannot take, else None."""
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            down = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            return (
                f"{name} {value} is not a positive multiple of {SIZE_MULTIPLE}: "
                f"use {down} or {down + SIZE_MULTIPLE}"
            )
        if value > MAX_SIZE:
            return f"{name} {value} is more than {MAX_SIZE}"
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


def latent_frames_for(length: float, unit: str, chunk_frames: int, fps: float = WAN_FPS) -> int:
    """Latent frames for a requested length, rounded to whole chunks (at least one).

    A video of T latent frames has 1 + 4 (T - 1) frames: 5 s at 16 fps -> 21 latent frames (81 frames),
    30 s -> 120 (477 frames), as in the reference's 5 s and 30 s settings.
    """
    if length is None or length <= 0:
        raise ValueError(f"length must be more than 0 {unit}, got {length}")
    if unit == "seconds":
        frames = round(length * fps)
    elif unit == "frames":
        frames = int(length)
    else:
        raise ValueError(f"length unit must be 'seconds' or 'frames', got {unit!r}")
    latent = (max(frames, 1) - 1 + 3) // 4 + 1
    return max(1, round(latent / chunk_frames)) * chunk_frames


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
