"""EMA-Sink / window settings: a StreamConfig for the generators (the model itself is never touched)."""

from __future__ import annotations

from rf_core.config import SINK_POLICIES, StreamConfig

from ..common import CATEGORY

_DEFAULT = StreamConfig()


class RewardForcingStreamSettings:
    DESCRIPTION = (
        "How the stream remembers the past: an attention sink of the first frames (EMA-updated in Reward "
        "Forcing) plus a sliding window of recent frames. Connect to Stream Generate or Stream Session."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("RF_STREAM_CONFIG",)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Stream settings for the generators.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sink_policy": (
                    list(SINK_POLICIES),
                    {
                        "default": _DEFAULT.sink_policy,
                        "tooltip": "ema: frames leaving the window are blended into the sink (Reward Forcing). "
                        "static: the sink keeps the first frames (Self-Forcing/LongLive). none: plain sliding "
                        "window. global: no eviction, the stream stops at max_frames.",
                    },
                ),
                "sink_frames": (
                    "INT",
                    {
                        "default": _DEFAULT.sink_frames,
                        "min": 0,
                        "max": 64,
                        "tooltip": "Latent frames kept as the sink at the start of the window (Reward Forcing: 3).",
                    },
                ),
                "window_frames": (
                    "INT",
                    {
                        "default": _DEFAULT.window_frames,
                        "min": 1,
                        "max": 256,
                        "tooltip": "Latent frames attended per chunk, counting the sink and the current chunk "
                        "(Reward Forcing: 9). Must be at least sink_frames + chunk_frames.",
                    },
                ),
                "ema_alpha": (
                    "FLOAT",
                    {
                        "default": _DEFAULT.ema_alpha,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.0001,
                        "round": 0.0001,
                        "tooltip": "EMA weight of the old sink: sink = alpha * sink + (1 - alpha) * evicted "
                        "(Reward Forcing: 0.999). 1.0 behaves like static.",
                    },
                ),
            },
            "optional": {
                "chunk_frames": (
                    "INT",
                    {
                        "default": _DEFAULT.chunk_frames,
                        "min": 1,
                        "max": 16,
                        "tooltip": "Latent frames generated per chunk (the model was trained with 3 = 12 video frames).",
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": _DEFAULT.shift,
                        "min": 0.1,
                        "max": 20.0,
                        "step": 0.1,
                        "tooltip": "Flow-matching timestep shift (Reward Forcing: 5.0).",
                    },
                ),
                "max_frames": (
                    "INT",
                    {
                        "default": _DEFAULT.max_frames,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "Only for the global policy: latent frames the cache can hold (21 = 5 s).",
                    },
                ),
            },
        }

    def build(
        self,
        sink_policy: str,
        sink_frames: int,
        window_frames: int,
        ema_alpha: float,
        chunk_frames: int = _DEFAULT.chunk_frames,
        shift: float = _DEFAULT.shift,
        max_frames: int = _DEFAULT.max_frames,
    ):
        config = StreamConfig(
            chunk_frames=chunk_frames,
            window_frames=window_frames,
            sink_frames=sink_frames,
            sink_policy=sink_policy,
            ema_alpha=ema_alpha,
            shift=shift,
            max_frames=max_frames,
        )
        return (config,)


NODE_CLASS_MAPPINGS = {"RewardForcingStreamSettings": RewardForcingStreamSettings}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardForcingStreamSettings": "Reward Forcing: EMA-Sink Settings"}
