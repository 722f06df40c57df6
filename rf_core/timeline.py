"""Prompt timelines: which prompt is active from which chunk of a stream.

A time is given in seconds ("10s", "2.5s"), in video frames ("120f") or in chunks ("4c"); it maps to
the first chunk whose video frames start at or after that time (chunk c starts at video frame
12c - 3 for c > 0 with 3-frame chunks: the first latent frame makes one video frame, later ones 4).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptCue:
    chunk: int
    prompt: str


def chunk_start_frame(chunk: int, chunk_frames: int = 3) -> int:
    """First video frame of a chunk."""
    return 0 if chunk == 0 else 1 + 4 * (chunk * chunk_frames - 1)


def parse_time(text: str, fps: float, chunk_frames: int = 3) -> int:
    """Chunk index at which a cue given as '10s', '120f' or '4c' takes effect."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([sfc])\s*", text)
    if not m:
        raise ValueError(
            f"cannot read time {text!r}: use seconds ('10s'), video frames ('120f') or chunks ('4c')"
        )
    value, unit = float(m.group(1)), m.group(2)
    if unit == "c":
        if value != int(value):
            raise ValueError(f"chunk index must be whole, got {text!r}")
        return int(value)
    frame = value * fps if unit == "s" else value
    if frame <= 1e-9:
        return 0
    # chunk c > 0 starts at 4 c chunk_frames - 3: the first c reaching the frame, in closed form
    # (a loop would run for minutes on a time far past any video)
    return max(1, math.ceil((frame - 1e-9 + 3) / (4 * chunk_frames)))


def build_timeline(
    first: str, cues: list[tuple[str, str]], fps: float, chunk_frames: int = 3
) -> list[PromptCue]:
    """Sorted cues starting with ``first`` at chunk 0; a later cue at the same chunk wins."""
    out = {0: first}
    for when, prompt in cues:
        out[parse_time(when, fps, chunk_frames)] = prompt
    return [PromptCue(c, p) for c, p in sorted(out.items())]


def latent_frames_for(video_frames: int, chunk_frames: int = 3) -> int:
    """Latent frames (a whole number of chunks) giving at least ``video_frames`` video frames."""
    if video_frames < 1:
        raise ValueError(f"length must be at least one video frame, got {video_frames}")
    t = (video_frames - 1 + 3) // 4 + 1
    return max(chunk_frames, math.ceil(t / chunk_frames) * chunk_frames)
