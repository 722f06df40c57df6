"""Prompt Timeline: a storyboard of prompts at times for Stream Generate, as the CLI's ``--prompt-at``.

One line per prompt, ``TIME: PROMPT``, with TIME in seconds (``10s``), video frames (``120f``) or
chunks (``4c``), counted from the start of the output video (rf_core/timeline.py, also for a video
that opens with a start image or an extended video). ``TIME (recache): ...`` or
``TIME (no recache): ...`` overrides the node's re-cache setting for that switch. Blank lines and lines
starting with ``#`` are skipped. Each prompt is encoded with the connected CLIP as CLIP Text Encode does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rf_core import timeline

from ..common import CATEGORY, InputError, recache_widget
from ..conditioning import prompt_embeds

EXAMPLE = """0s: a red fox trotting through fresh snow in a pine forest, soft morning light
3s: the fox stops and looks up as snow starts to fall
6s (no recache): the fox leaps into a snowdrift, powder flying"""

_LINE = re.compile(
    r"\s*(?P<time>\d+(?:\.\d+)?\s*[sfc])\s*(?:\((?P<option>recache|no recache)\))?\s*:\s*(?P<prompt>.*?)\s*"
)


@dataclass(frozen=True)
class TimelineCue:
    line: int  # 1-based line of the node's text, for messages
    time: str  # as written: "10s", "120f", "4c"
    prompt: str
    conditioning: list  # the prompt's CONDITIONING, as CLIP Text Encode gives it
    recache: bool

    @property
    def label(self) -> str:
        return f"timeline line {self.line} ({self.time}: {self.prompt[:40]!r})"


@dataclass(frozen=True)
class PromptTimeline:
    """What the RF_TIMELINE socket carries: the cues in the order written."""

    cues: tuple[TimelineCue, ...]


@dataclass(frozen=True)
class Switch:
    embeds: torch.Tensor  # [1, text_len, text_dim]
    recache: bool


def parse_lines(text: str, recache: bool = True) -> list[tuple[int, str, str, bool]]:
    """(line, time, prompt, recache) for every prompt line; a line that is not ``TIME: PROMPT`` is an error."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if m is None or not m["prompt"]:
            raise ValueError(
                f"text line {n}: {line.strip()[:60]!r} is not 'TIME: PROMPT' (TIME as 10s, 120f or 4c, "
                "optionally followed by (recache) or (no recache); e.g. '5s: the fox leaps into a river')"
            )
        timeline.parse_time(m["time"], fps=16.0)  # the unit and number are valid
        option = m["option"]
        out.append(
            (n, m["time"].replace(" ", ""), m["prompt"], recache if option is None else option == "recache")
        )
    if not out:
        raise ValueError("text holds no prompt line: write one 'TIME: PROMPT' per line, e.g. '0s: a red fox'")
    return out


class RewardForcingPromptTimeline:
    DESCRIPTION = (
        "A storyboard for Stream Generate: prompts at times, one 'TIME: PROMPT' line each (TIME as 10s, 120f "
        "or 4c, counted from the start of the output video). Each switch happens at the first chunk that "
        "starts at or after its time."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("RF_TIMELINE",)
    RETURN_NAMES = ("timeline",)
    OUTPUT_TOOLTIPS = ("The prompts and their times, for Stream Generate's timeline input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": (
                    "CLIP",
                    {"tooltip": "The umT5 text encoder (Load CLIP, type wan) that encodes each prompt."},
                ),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": EXAMPLE,
                        "tooltip": "One prompt per line: 'TIME: PROMPT', TIME in seconds (10s), video frames "
                        "(120f) or chunks (4c) from the start of the output video. A line at 0s gives the "
                        "opening prompt (or connect positive on Stream Generate). 'TIME (no recache): ...' or "
                        "'TIME (recache): ...' overrides the recache setting for that switch; lines starting "
                        "with # are skipped.",
                    },
                ),
                "recache": recache_widget("switch"),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, text=None):
        if text is not None:
            try:
                parse_lines(text)
            except ValueError as err:
                raise InputError(str(err)) from None
        return True

    def build(self, clip, text: str, recache: bool = True):
        if clip is None or not hasattr(clip, "tokenize"):
            raise ValueError(f"clip: expected a CLIP from Load CLIP (type wan), got {type(clip).__name__}")
        encoded: dict[str, list] = {}
        cues = []
        for line, time, prompt, switch_recache in parse_lines(text, recache):
            if prompt not in encoded:  # as CLIP Text Encode
                encoded[prompt] = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
            cues.append(TimelineCue(line, time, prompt, encoded[prompt], switch_recache))
        return (PromptTimeline(tuple(cues)),)


def cue_chunks(
    tl: PromptTimeline, has_opening: bool, *, fps: float, chunk_frames: int, prefix: int, chunks: int
) -> dict[int, TimelineCue]:
    """The timeline's cues by chunk of the stream (prefill chunks included, rf_core/timeline.py), checked
    against the video: ``has_opening`` (positive is connected) and a line at the start both giving the
    opening prompt, two lines at one chunk, a time after the video's end, or no opening prompt at all
    are errors naming the line."""
    if not isinstance(tl, PromptTimeline):
        raise ValueError(f"timeline: expected an RF_TIMELINE from Prompt Timeline, got {type(tl).__name__}")
    total = timeline.prefill_chunks(prefix, chunk_frames) + chunks
    end = timeline.chunk_start_frame(total, chunk_frames, prefix)
    at: dict[int, TimelineCue] = {}
    for cue in tl.cues:
        try:
            chunk = timeline.parse_time(cue.time, fps, chunk_frames, prefix)
        except ValueError as err:
            raise ValueError(f"{cue.label}: {err}") from None
        start = timeline.chunk_start_frame(chunk, chunk_frames, prefix)
        if chunk >= total:
            raise ValueError(
                f"{cue.label}: the switch would come at video frame {start}, after the video's end ({end} "
                f"frames, {end / fps:.2f} s at {fps:g} fps); give an earlier time or a longer length"
            )
        if chunk in at:
            raise ValueError(
                f"{cue.label} and {at[chunk].label} both start at chunk {chunk} (video frame {start}; a chunk "
                f"is {4 * chunk_frames} frames): move one of them"
            )
        at[chunk] = cue
    if 0 in at and has_opening:
        raise ValueError(
            f"positive and {at[0].label} both give the opening prompt: disconnect positive, or start the "
            "timeline later"
        )
    if 0 not in at and not has_opening:
        raise ValueError(
            f"the timeline starts at {at[min(at)].time} and positive is not connected: add a '0s: PROMPT' line "
            "for the opening, or connect positive"
        )
    return dict(sorted(at.items()))


def schedule(
    tl: PromptTimeline | None,
    opening: torch.Tensor | None,
    *,
    fps: float,
    chunk_frames: int,
    prefix: int,
    chunks: int,
    text_dim: int,
    text_len: int,
) -> tuple[torch.Tensor, dict[int, Switch]]:
    """The opening prompt's embeddings and the switches by chunk of the stream, from ``positive``'s
    embeddings (``opening``, or None) and a timeline (or None); see ``cue_chunks`` for the checks."""
    if tl is None:
        if opening is None:
            raise ValueError("connect positive (a prompt) or timeline (Reward Forcing: Prompt Timeline)")
        return opening, {}
    at = cue_chunks(tl, opening is not None, fps=fps, chunk_frames=chunk_frames, prefix=prefix, chunks=chunks)
    switches = {
        chunk: Switch(prompt_embeds(cue.conditioning, text_dim, text_len, cue.label), cue.recache)
        for chunk, cue in at.items()
    }
    if opening is None:
        opening = switches.pop(0).embeds
    return opening, switches


NODE_CLASS_MAPPINGS = {"RewardForcingPromptTimeline": RewardForcingPromptTimeline}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardForcingPromptTimeline": "Reward Forcing: Prompt Timeline"}
