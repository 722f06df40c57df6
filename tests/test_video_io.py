"""MP4 / PNG writers: rounding, layouts, sizes, and files that survive Ctrl-C and SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from rf_core.io.video import (
    Mp4Writer,
    PngSequenceWriter,
    frames_to_uint8,
    probe_video,
    read_video_frames,
)

ROOT = Path(__file__).resolve().parents[1]
W, H = 64, 48


def _grey_chunk(start: int, count: int = 12) -> torch.Tensor:
    """Frames [F, 3, H, W] in [0, 1]; frame n is a flat grey of level 2n (so order is checkable)."""
    levels = torch.tensor([(2 * n) % 256 for n in range(start, start + count)], dtype=torch.float32)
    return (levels / 255.0).reshape(-1, 1, 1, 1).expand(count, 3, H, W).clone()


def _assert_grey_prefix(frames: np.ndarray, first: int = 0):
    """Frame i of the file is the grey level written for frame first + i (H.264 error <= 3 levels)."""
    for i, frame in enumerate(frames):
        assert abs(float(frame.mean()) - (2 * (first + i)) % 256) <= 3, i


# ---------------------------------------------------------------- conversion


def test_rounding_to_uint8():
    k = torch.arange(256, dtype=torch.float32)
    exact = frames_to_uint8((k / 255).reshape(1, 1, 256, 1).expand(1, 1, 256, 3))
    assert exact[0, 0, :, 0].tolist() == list(range(256))  # k/255 comes back as k
    values = torch.tensor([0.999, 0.998, 0.5 / 255, 0.4999 / 255, 100.6 / 255, 1.5, -0.2, float("nan")])
    got = frames_to_uint8(values.reshape(1, 1, -1, 1).expand(1, 1, -1, 3))[0, 0, :, 0].tolist()
    # 0.999*255 = 254.7 -> 255 (a cast gives 254); 0.998*255 = 254.49 -> 254; halves round up.
    assert got == [255, 254, 1, 0, 101, 255, 0, 0]
    assert (
        frames_to_uint8(values.to(torch.bfloat16).reshape(1, 1, -1, 1).expand(1, 1, -1, 3)).dtype == np.uint8
    )


def test_layouts_and_inputs():
    hwc = torch.rand(2, 5, 7, 3)
    a = frames_to_uint8(hwc)
    b = frames_to_uint8(hwc.permute(0, 3, 1, 2))  # [F, 3, H, W]
    c = frames_to_uint8(hwc.numpy())
    assert a.shape == (2, 5, 7, 3) and a.flags["C_CONTIGUOUS"]
    assert np.array_equal(a, b) and np.array_equal(a, c)
    u8 = (torch.rand(2, 5, 7, 3) * 255).to(torch.uint8)
    assert np.array_equal(frames_to_uint8(u8), u8.numpy())  # uint8 passes unchanged
    with pytest.raises(ValueError, match=r"4-D.*\[5, 7, 3\]"):
        frames_to_uint8(hwc[0])
    with pytest.raises(ValueError, match="3 colour channels"):
        frames_to_uint8(torch.rand(2, 4, 5, 4))
    with pytest.raises(ValueError, match="int32"):
        frames_to_uint8(torch.zeros(1, 2, 2, 3, dtype=torch.int32))


# ---------------------------------------------------------------- MP4


def test_mp4_chunks_have_requested_count_size_and_content(tmp_path):
    path = tmp_path / "out" / "clip.mp4"
    with Mp4Writer(path, fps=16) as w:
        for c in range(3):
            w.write(_grey_chunk(12 * c))  # [F, 3, H, W] float
    assert w.frames_written == 36
    assert path.is_file() and not w.partial_path.exists()
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (36, W, H)
    assert info.fps == pytest.approx(16)
    _assert_grey_prefix(read_video_frames(path))


def test_mp4_uint8_channels_last_and_classic_mp4(tmp_path):
    frames = frames_to_uint8(_grey_chunk(0, 5))
    path = tmp_path / "classic.mp4"
    with Mp4Writer(path, fps=8, fragmented=False) as w:
        w.write(frames)
    info = probe_video(path)
    assert (info.frames, info.width, info.height, info.fps) == (5, W, H, 8)


def test_odd_sizes_are_padded_or_refused(tmp_path):
    frames = torch.rand(4, 47, 63, 3)
    with Mp4Writer(tmp_path / "odd.mp4") as w:
        w.write(frames)
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.frames, info.width, info.height) == (4, 64, 48)
    with pytest.raises(ValueError, match=r"even frame sizes, got 63x47"):
        with Mp4Writer(tmp_path / "refused.mp4", odd_size="error") as w:
            w.write(frames)
    assert not (tmp_path / "refused.mp4").exists()


def test_frame_size_change_and_empty_writer(tmp_path):
    with pytest.raises(ValueError, match=r"got 32x32, expected 64x48"):
        with Mp4Writer(tmp_path / "a.mp4") as w:
            w.write(_grey_chunk(0, 2))
            w.write(torch.rand(2, 32, 32, 3))
    assert probe_video(tmp_path / "a.mp4").frames == 2  # what came before the bad chunk is kept
    with Mp4Writer(tmp_path / "empty.mp4"):
        pass
    assert not (tmp_path / "empty.mp4").exists()


def test_keyboard_interrupt_between_chunks_leaves_playable_file(tmp_path):
    path = tmp_path / "interrupted.mp4"
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(path) as w:
            w.write(_grey_chunk(0))
            w.write(_grey_chunk(12))
            raise KeyboardInterrupt
    frames = read_video_frames(path)
    assert len(frames) == 24
    _assert_grey_prefix(frames)


def test_two_writers_to_one_target_never_share_a_partial_file(tmp_path):
    path = tmp_path / "same.mp4"
    first, second = Mp4Writer(path), Mp4Writer(path)
    assert first.partial_path != second.partial_path
    assert first.partial_path.name.startswith("same.") and first.partial_path.name.endswith(".partial.mp4")
    first.write(_grey_chunk(0))  # interleaved chunks: each file must hold only its own writer's frames
    second.write(_grey_chunk(100, 5))
    first.write(_grey_chunk(12))
    second.close()
    assert probe_video(path).frames == 5
    first.close()
    frames = read_video_frames(path)  # the last to finish is the file, whole and unmixed
    assert len(frames) == 24
    _assert_grey_prefix(frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.mp4"]


def test_no_overwrite_keeps_a_file_made_meanwhile_and_the_new_frames(tmp_path):
    path = tmp_path / "taken.mp4"
    w = Mp4Writer(path, overwrite=False)
    w.write(_grey_chunk(0))
    path.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match=r"taken\.mp4 appeared.*not replaced.*partial\.mp4"):
        w.close()
    assert path.read_bytes() == b"someone else's file"
    assert len(read_video_frames(w.partial_path)) == 12
    # and without a competitor the file is moved into place, no partial left
    fresh = Mp4Writer(tmp_path / "fresh.mp4", overwrite=False)
    with fresh:
        fresh.write(_grey_chunk(0, 3))
    assert probe_video(tmp_path / "fresh.mp4").frames == 3 and not fresh.partial_path.exists()


def test_mp4_writer_refuses_a_folder_before_any_frame(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        Mp4Writer(tmp_path)
    assert list(tmp_path.iterdir()) == []


_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from rf_core.io.video import Mp4Writer

    with Mp4Writer(sys.argv[1], fps=16) as w:
        for c in range(int(sys.argv[2])):
            level = np.array([(2 * n) % 256 for n in range(12 * c, 12 * c + 12)], np.uint8)
            w.write(np.broadcast_to(level[:, None, None, None], (12, 48, 64, 3)))
        print("written", flush=True)
        time.sleep(60)
    """
)


def _start_child(tmp_path: Path, chunks: int) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "killed.mp4"), str(chunks)],
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, like a terminal job
    )
    assert proc.stdout.readline().strip() == b"written"
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return proc, [int(c) for c in children]


def _partial_of(tmp_path: Path, pid: int) -> Path | None:
    """The child's partial file (named with its pid and a random token), once it exists."""
    found = list(tmp_path.glob(f"killed.{pid}-*.partial.mp4"))
    assert len(found) <= 1, found
    return found[0] if found else None


def _wait_gone(pid: int, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running")


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc to find ffmpeg")


@linux_only
def test_ctrl_c_to_the_process_group_finishes_the_file(tmp_path):
    proc, _ = _start_child(tmp_path, chunks=3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert proc.wait(timeout=30) != 0  # ended by KeyboardInterrupt, after __exit__ closed the writer
    frames = read_video_frames(tmp_path / "killed.mp4")
    assert len(frames) == 36
    _assert_grey_prefix(frames)


@linux_only
def test_sigkill_of_python_keeps_every_frame_in_partial_file(tmp_path):
    proc, ffmpeg = _start_child(tmp_path, chunks=3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in ffmpeg:  # ffmpeg, in its own group, sees its input end and finishes the file
        _wait_gone(pid)
    assert not (tmp_path / "killed.mp4").exists()
    frames = read_video_frames(_partial_of(tmp_path, proc.pid))
    assert len(frames) == 36
    _assert_grey_prefix(frames)


@linux_only
def test_sigkill_of_python_and_ffmpeg_keeps_complete_fragments(tmp_path):
    proc, ffmpeg = _start_child(tmp_path, chunks=10)  # 120 frames, a fragment per 16
    # Give ffmpeg time to encode and flush what it can, then kill everything at once.
    last, stable_since, deadline = 0, time.monotonic(), time.monotonic() + 20
    while (last == 0 or time.monotonic() - stable_since < 1.0) and time.monotonic() < deadline:
        partial = _partial_of(tmp_path, proc.pid)
        size = partial.stat().st_size if partial is not None else 0
        if size != last:
            last, stable_since = size, time.monotonic()
        time.sleep(0.05)
    for pid in ffmpeg:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    frames = read_video_frames(_partial_of(tmp_path, proc.pid))
    assert 16 <= len(frames) <= 120
    _assert_grey_prefix(frames)


# ---------------------------------------------------------------- PNG sequence


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def test_ffmpeg_starts_while_another_thread_holds_locals_whose_cleanup_blocks(tmp_path):
    """A forked child that runs Python code (a ``preexec_fn``) first frees the other threads' states,
    running their thread-locals' finalizers; one that blocks there (inside ComfyUI: the video decoder
    Load Video left in the worker thread's locals) hangs the child, and the writer with it, forever."""
    held = threading.Lock()
    held.acquire()

    class BlocksWhenFreed:
        def __del__(self):
            held.acquire()  # the lock is held: in a child that frees it, this never returns

    ready, finish = threading.Event(), threading.Event()

    def owner():
        local = threading.local()
        local.value = BlocksWhenFreed()
        ready.set()
        finish.wait()

    threading.Thread(target=owner, daemon=True).start()
    ready.wait()
    written = []

    def write():
        with Mp4Writer(tmp_path / "v.mp4", fps=16) as w:
            w.write(_grey_chunk(0, 2))
        written.append(True)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(30)
    held.release()  # the owner's local is freed when it ends
    finish.set()
    if writer.is_alive():  # a child stuck before exec would hold pytest's output open: end it
        for child in _children(os.getpid()):
            os.kill(child, signal.SIGKILL)
    assert written, "starting ffmpeg hung"
    assert len(read_video_frames(tmp_path / "v.mp4")) == 2


def test_png_sequence_is_lossless_and_rounds(tmp_path):
    k = torch.arange(256, dtype=torch.float32)
    frame = ((k + 0.4) / 255).clamp(max=1).reshape(1, 16, 16, 1).expand(1, 16, 16, 3)
    with PngSequenceWriter(tmp_path / "seq") as w:
        w.write(frame)
        w.write(torch.zeros(2, 3, 16, 16))
    names = sorted(p.name for p in (tmp_path / "seq").iterdir())
    assert names == ["frame_000000.png", "frame_000001.png", "frame_000002.png"]
    first = iio.imread(tmp_path / "seq" / "frame_000000.png")
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    assert first[..., 0].reshape(-1).tolist() == list(range(256))
    assert (iio.imread(tmp_path / "seq" / "frame_000002.png") == 0).all()
    with pytest.raises(ValueError, match="closed"):
        w.write(frame)
