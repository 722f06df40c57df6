"""Prompt timelines: which prompt is active from which chunk of a stream.

A time is given in seconds ("10s", "2.5s"), in video frames ("120f") or in chunks ("4c"); it maps to
the first chunk whose video frames start at or after that time (chunk c starts at video frame
12c - 3 for c > 0 with 3-frame chunks: the first latent frame makes one video frame, later ones 4).

A stream may open with a prefix: the latent frames of a start image (1) or of a video being extended
(1 + k for 1 + 4k frames), prefilled rather than generated. Times still count from the start of the
output video, which opens with the prefix's frames, and chunk indices count the prefill chunks too: the
prefix is cut into ``prefill_chunks(prefix)`` chunks as ``StreamSession.prefill`` cuts it (whole chunks,
then a shorter one), and the generated chunks follow, starting at latent frame ``prefix``. A prompt
switch happens between chunks of the stream, so a time that would switch during the prefill (after its
first chunk, before its last) is refused; one in the prefix's last chunk switches right after the
prefill, before the first generated chunk.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptCue:
    chunk: int  # chunk of the stream, prefill chunks included
    prompt: str


def latent_start_frame(latent: int) -> int:
    """First video frame of a latent frame: 0 for the first, then 4 per latent frame."""
    return 0 if latent == 0 else 4 * latent - 3


def prefill_chunks(prefix: int, chunk_frames: int = 3) -> int:
    """Chunks a prefix of ``prefix`` latent frames is prefilled in."""
    return math.ceil(prefix / chunk_frames)


def chunk_start_frame(chunk: int, chunk_frames: int = 3, prefix: int = 0) -> int:
    """First video frame of chunk ``chunk`` of a stream opened by a prefix of ``prefix`` latent frames."""
    opening = prefill_chunks(prefix, chunk_frames)
    if chunk < opening:
        return latent_start_frame(chunk * chunk_frames)
    return latent_start_frame(prefix + (chunk - opening) * chunk_frames)


def parse_time(text: str, fps: float, chunk_frames: int = 3, prefix: int = 0) -> int:
    """Chunk of the stream at which a cue given as '10s', '120f' or '4c' takes effect (see the module
    notes for ``prefix``); 0 is the opening prompt's."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([sfc])\s*", text)
    if not m:
        raise ValueError(
            f"cannot read time {text!r}: use seconds ('10s'), video frames ('120f') or chunks ('4c')"
        )
    value, unit = float(m.group(1)), m.group(2)
    opening = prefill_chunks(prefix, chunk_frames)
    if unit == "c":
        if value != int(value):
            raise ValueError(f"chunk index must be whole, got {text!r}")
        chunk = int(value)
    else:
        frame = value * fps if unit == "s" else value
        if frame <= 1e-9:
            return 0
        last_prefill = chunk_start_frame(opening - 1, chunk_frames, prefix) if opening else 0
        if frame <= last_prefill + 1e-9:
            chunk = 1  # during the prefill: refused below
        else:
            # generated chunk g starts at frame 4 (prefix + g chunk_frames) - 3: the first g reaching the
            # frame, in closed form (a loop would run for minutes on a time far past any video)
            g = math.ceil((frame - 1e-9 + 3 - 4 * prefix) / (4 * chunk_frames))
            chunk = opening + max(0, g)
    if 0 < chunk < opening:
        last = chunk_start_frame(opening - 1, chunk_frames, prefix)
        raise ValueError(
            f"time {text!r} falls inside the input video that opens the output (its frames 0.."
            f"{latent_start_frame(prefix) - 1}, chunks 0..{opening - 1}), where the prompt cannot change: give "
            f"a time after frame {last} ({last / fps:.2f} s), or {opening}c or later"
        )
    return chunk


def build_timeline(
    first: str, cues: list[tuple[str, str]], fps: float, chunk_frames: int = 3, prefix: int = 0
) -> list[PromptCue]:
    """Sorted cues starting with ``first`` at chunk 0; a later cue at the same chunk wins."""
    out = {0: first}
    for when, prompt in cues:
        out[parse_time(when, fps, chunk_frames, prefix)] = prompt
    return [PromptCue(c, p) for c, p in sorted(out.items())]


def latent_frames_for(video_frames: int, chunk_frames: int = 3, prefix: int = 0) -> int:
    """Latent frames (a whole number of chunks) giving at least ``video_frames`` video frames; after a
    prefix, new video frames (4 per latent frame: the decoder goes on from the prefix's frames)."""
    if video_frames < 1:
        raise ValueError(f"length must be at least one video frame, got {video_frames}")
    t = (video_frames - 1 + 3) // 4 + 1 if prefix == 0 else math.ceil(video_frames / 4)
    return max(chunk_frames, math.ceil(t / chunk_frames) * chunk_frames)
