"""Writing generated frames as they arrive: H.264 MP4 (through imageio-ffmpeg) or a PNG sequence.

Both writers take chunks of frames — float in [0, 1] or uint8, laid out ``[F, H, W, 3]`` (ComfyUI
IMAGE) or ``[F, 3, H, W]`` (torch/VAE output), as torch tensors or numpy arrays — and keep only
one chunk in memory.

An interrupted MP4 stays playable:

* The MP4 is written as fragmented MP4 (``empty_moov`` + a fragment per keyframe interval, flushed
  as they complete), so even if ffmpeg itself dies, every completed fragment is readable.
* ffmpeg runs in its own session (process group), so Ctrl-C does not reach it; ``close()`` (also
  called by ``__exit__`` on an exception such as KeyboardInterrupt) lets it encode every frame sent
  so far and finish the file. The session is made by ``start_new_session``, not by a ``preexec_fn``
  (as ``imageio_ffmpeg.write_frames`` does it): Python code run in a forked child of a threaded
  process can hang forever, e.g. inside ComfyUI after Load Video, whose decoder state sits in another
  thread's thread-locals, when the writer thread starts ffmpeg.
* If our process is killed, ffmpeg sees its input end, finishes the file and exits on its own.

While writing, the video lives in a partial file next to the target, named for this run
(``<stem>.<pid>-<token>.partial<suffix>``, see rf_core/io/partial.py), and ``close()`` moves it onto
the target in one step; after a hard kill the frames so far are in that partial file.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from rf_core.io.partial import partial_path, publish

_ODD_SIZE_POLICIES = ("pad", "error")


def frames_to_uint8(frames: torch.Tensor | np.ndarray, layout: str = "auto") -> np.ndarray:
    """Frames as contiguous uint8 ``[F, H, W, 3]``.

    Floats are taken as [0, 1], clamped (NaN -> 0) and rounded to the nearest level, halves up:
    ``floor(255 x + 0.5)``, so ``k / 255`` maps back to ``k`` exactly and 0.999 to 255 (a cast would
    truncate: 0.999 -> 254). ``layout`` is "auto", "fhwc" or "fchw"; auto picks channels-last when
    the last axis has 3 entries, otherwise channels-first when axis 1 has 3.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be 4-D [F, H, W, 3] or [F, 3, H, W], got shape {list(frames.shape)}")
    if layout == "auto":
        if frames.shape[-1] == 3:
            layout = "fhwc"
        elif frames.shape[1] == 3:
            layout = "fchw"
        else:
            raise ValueError(f"frames need 3 colour channels on axis 1 or 3, got shape {list(frames.shape)}")
    if layout not in ("fhwc", "fchw"):
        raise ValueError(f"layout must be 'auto', 'fhwc' or 'fchw', got {layout!r}")
    channel_axis = 3 if layout == "fhwc" else 1
    if frames.shape[channel_axis] != 3:
        raise ValueError(f"layout {layout} needs 3 channels, got shape {list(frames.shape)}")
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if layout == "fchw":
        frames = frames.permute(0, 2, 3, 1)
    if frames.dtype != torch.uint8:
        if not frames.is_floating_point():
            raise ValueError(f"frames must be floating point in [0, 1] or uint8, got {frames.dtype}")
        # Round on the frames' own device: a quarter of the bytes then cross to the host.
        frames = round_to_uint8(frames)
    return np.ascontiguousarray(frames.cpu().numpy())


def round_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 on their own device: clamped, NaN -> 0, floor(255 x + 0.5)."""
    x = torch.nan_to_num(frames.float(), nan=0.0).clamp(0.0, 1.0)
    return torch.floor(x * 255.0 + 0.5).to(torch.uint8)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row/column where a size is odd (yuv420p halves both axes)."""
    h, w = frames.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


class _ChunkedWriter:
    """Shared chunk bookkeeping: one frame size per stream, context manager closes."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.frames_written = 0
        self.frame_size: tuple[int, int] | None = None  # (width, height) of the frames given
        self.closed = False

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append a chunk of frames."""
        if self.closed:
            raise ValueError(f"{type(self).__name__} is closed")
        data = frames_to_uint8(frames, self.layout)
        size = (data.shape[2], data.shape[1])
        if self.frame_size is None:
            self._start(size)
            self.frame_size = size
        elif size != self.frame_size:
            raise ValueError(
                f"frame size changed mid-stream: got {size[0]}x{size[1]}, "
                f"expected {self.frame_size[0]}x{self.frame_size[1]}"
            )
        self._write(data)

    def _start(self, size: tuple[int, int]) -> None:
        pass

    def _write(self, frames: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        # Also on KeyboardInterrupt: finishing the file keeps the frames written so far.
        self.close()


class Mp4Writer(_ChunkedWriter):
    """H.264 yuv420p MP4, appended chunk by chunk.

    fps: frame rate (Wan: 16). crf/preset: x264 quality and speed. keyframe_interval: frames per
    keyframe, which is also the fragment length, i.e. the most a crash of ffmpeg itself can lose
    (default: one second). fragmented: False writes a classic MP4 (index at the end, moved to the
    front on close) for players that dislike fragmented files; it is then only valid once closed.
    odd_size: "pad" repeats the last row/column to reach even sizes, "error" refuses odd sizes.
    overwrite: False makes ``close()`` refuse to replace a file that exists at the target by then
    (FileExistsError; the video stays in ``partial_path``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = 16,
        crf: int = 18,
        preset: str = "medium",
        keyframe_interval: int | None = None,
        fragmented: bool = True,
        odd_size: str = "pad",
        layout: str = "auto",
        overwrite: bool = True,
    ) -> None:
        super().__init__(layout)
        if odd_size not in _ODD_SIZE_POLICIES:
            raise ValueError(f"odd_size must be one of {_ODD_SIZE_POLICIES}, got {odd_size!r}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a folder; an MP4 writer needs a file name")
        self.partial_path = partial_path(self.path, default_suffix=".mp4")
        self.overwrite = overwrite
        self.fps = fps
        self.crf = crf
        self.preset = preset
        self.keyframe_interval = keyframe_interval or max(1, round(fps))
        self.fragmented = fragmented
        self.odd_size = odd_size
        self._proc: subprocess.Popen | None = None

    def _start(self, size: tuple[int, int]) -> None:
        import imageio_ffmpeg

        w, h = size
        if (w % 2 or h % 2) and self.odd_size == "error":
            raise ValueError(f"H.264 yuv420p needs even frame sizes, got {w}x{h} (use odd_size='pad')")
        w, h = w + w % 2, h + h % 2
        self.path.parent.mkdir(parents=True, exist_ok=True)
        movflags = "+frag_keyframe+empty_moov+default_base_moof" if self.fragmented else "+faststart"
        fps = Fraction(self.fps).limit_denominator(1001)
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-an",
            "-vcodec", "libx264", "-pix_fmt", "yuv420p",
            "-crf", str(self.crf),
            "-preset", self.preset,
            "-g", str(self.keyframe_interval),
            "-movflags", movflags,
            "-flush_packets", "1",  # each fragment reaches the disk when it is complete
            "-f", "mp4", str(self.partial_path),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True
        )

    def _write(self, frames: np.ndarray) -> None:
        frames = _pad_to_even(frames)
        for frame in frames:
            try:
                self._proc.stdin.write(frame.tobytes())
            except (BrokenPipeError, ValueError):
                raise RuntimeError(
                    f"ffmpeg stopped while writing {self.path} (exit code {self._proc.poll()}; see its "
                    "messages above)"
                ) from None
            self.frames_written += 1

    def close(self) -> None:
        """Finish encoding and move the file into place. Without any frame, no file is made."""
        if self.closed:
            return
        self.closed = True
        if self._proc is None:
            return
        try:  # closing ffmpeg's input makes it finish the file
            self._proc.stdin.close()
        except BrokenPipeError:
            pass  # it stopped already: its exit code tells
        code = self._proc.wait()
        if code != 0:
            raise RuntimeError(
                f"ffmpeg failed writing {self.path} (exit code {code}; see its messages above)"
            )
        if not self.partial_path.is_file() or self.partial_path.stat().st_size == 0:
            raise RuntimeError(f"ffmpeg produced no output for {self.path} (see its messages above)")
        publish(self.partial_path, self.path, overwrite=self.overwrite)


class PngSequenceWriter(_ChunkedWriter):
    """Lossless frames as ``<directory>/<prefix><index>.png``; each file appears whole (renamed)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        prefix: str = "frame_",
        digits: int = 6,
        start_index: int = 0,
        layout: str = "auto",
    ) -> None:
        super().__init__(layout)
        self.directory = Path(directory)
        self.prefix = prefix
        self.digits = digits
        self.start_index = start_index
        self.paths: list[Path] = []

    def _start(self, size: tuple[int, int]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _write(self, frames: np.ndarray) -> None:
        import imageio.v3 as iio

        for frame in frames:
            index = self.start_index + self.frames_written
            target = self.directory / f"{self.prefix}{index:0{self.digits}d}.png"
            tmp = partial_path(target)
            try:
                iio.imwrite(tmp, frame, extension=".png")
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self.paths.append(target)
            self.frames_written += 1

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count (by decoding) and size of a video file."""
    frames = read_video_frames(path)
    meta = _video_meta(path)
    return VideoInfo(frames=len(frames), width=meta["size"][0], height=meta["size"][1], fps=meta["fps"])


def _video_meta(path: str | os.PathLike) -> dict:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return next(reader)
    finally:
        reader.close()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file (PNG, JPEG, WebP...) as uint8 ``[1, H, W, 3]``: the first frame of an animated one,
    alpha dropped, EXIF rotation applied (as ComfyUI's Load Image does). Raises ValueError when the
    file is not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file (PNG, JPEG, WebP...)") from None
    return np.asarray(rgb, dtype=np.uint8)[None].copy()


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Every frame of a video file as uint8 ``[F, H, W, 3]``, and its frame rate. Raises ValueError when
    ffmpeg cannot read the file as a video (the whole video is held in memory)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "video file not found", str(path))
    try:
        fps = float(_video_meta(path)["fps"])
        return read_video_frames(path), fps
    except (OSError, RuntimeError, KeyError, StopIteration):
        raise ValueError(f"{path}: not a video file ffmpeg can read") from None


def read_video_frames(path: str | os.PathLike) -> np.ndarray:
    """All decoded frames as uint8 ``[F, H, W, 3]`` (for tests and short clips)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    finally:
        reader.close()
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
