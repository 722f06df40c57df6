"""MP4 files in ComfyUI's output folder, appended as frames arrive, and the UI entries that show them."""

from __future__ import annotations

import os

import torch

from rf_core.io.video import Mp4Writer
from rf_core.io.writer_thread import WriterThread

from .. import comfy


class VideoFiles:
    """One MP4 per batch item, named like ComfyUI's SaveVideo (``<prefix>_00001_.mp4``), each encoded on
    its own thread (``queued``) so encoding runs beside generation."""

    def __init__(self, prefix: str, fps: float, batch: int, width: int = 0, height: int = 0) -> None:
        if not prefix.strip():
            raise ValueError("filename_prefix is empty: give a name such as 'RewardForcing/video'")
        folder, base, counter, subfolder = comfy.save_path(prefix, width, height)
        self.entries = []
        self.writers = []
        for i in range(batch):
            name = f"{base}_{counter + i:05}_.mp4"
            self.writers.append(Mp4Writer(os.path.join(folder, name), fps=fps))
            self.entries.append({"filename": name, "subfolder": subfolder, "type": "output"})
        self.queued = [WriterThread(w) for w in self.writers]

    def write(self, frames: torch.Tensor) -> None:
        """frames: [B, F, H, W, 3] in [0, 1] or uint8; not modified afterwards by the caller."""
        for writer, item in zip(self.queued, frames):
            writer.write(item)

    def close(self) -> list[dict]:
        """Finish the files (also after an error: the frames so far stay playable); their UI entries."""
        errors = []
        for writer in self.queued:
            try:
                writer.close()
            except Exception as err:  # finish the other files first
                errors.append(err)
        if errors:
            raise errors[0]
        return [e for e, w in zip(self.entries, self.writers) if w.frames_written]


def video_ui(entries: list[dict]) -> dict:
    """The ``ui`` payload ComfyUI's SaveVideo sends, so the browser shows the videos on the node."""
    return {"images": entries, "animated": (True,)} if entries else {}
