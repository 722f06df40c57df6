"""Reward Forcing streaming text-to-video: a plain PyTorch library (never imports ComfyUI)."""

from rf_core.config import PRESETS, DiTConfig, StreamConfig, get_preset

__all__ = ["PRESETS", "DiTConfig", "StreamConfig", "get_preset"]
__version__ = "0.1.0"
