"""Save Video: frames to an H.264 MP4 in the output folder, encoded a chunk at a time."""

from __future__ import annotations

import torch

from ..common import CATEGORY, WAN_FPS, fps_widget
from .files import VideoFiles, video_ui

CHUNK = 12  # frames converted and encoded at a time: one generated chunk, a bounded amount of memory


class RewardForcingSaveVideo:
    DESCRIPTION = (
        "Save frames as an MP4 (H.264) in the output folder. Stream Generate can also write the MP4 itself "
        "while chunks arrive (its filename_prefix); native Create Video + Save Video work as well."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Frames to save, in order."}),
                "fps": fps_widget("Frame rate (Wan: 16)."),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "RewardForcing/video",
                        "tooltip": "Output file name prefix; may include a subfolder.",
                    },
                ),
            }
        }

    def save(self, images: torch.Tensor, fps: float = WAN_FPS, filename_prefix: str = "RewardForcing/video"):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(
                f"images: expected an IMAGE [frames, H, W, 3], got {getattr(images, 'shape', images)}"
            )
        if images.shape[0] == 0:
            raise ValueError("images: no frames to save")
        files = VideoFiles(filename_prefix, fps, 1, images.shape[2], images.shape[1])
        try:
            for start in range(0, images.shape[0], CHUNK):
                files.write(images[None, start : start + CHUNK, ..., :3])
        finally:
            entries = files.close()
        return {"ui": video_ui(entries)}


NODE_CLASS_MAPPINGS = {"RewardForcingSaveVideo": RewardForcingSaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardForcingSaveVideo": "Reward Forcing: Save Video"}
