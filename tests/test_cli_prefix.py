"""`reward-forcing generate --image / --extend` (issue 15): the input's frames open the output, the new
frames are those of the stream prefilled with the input's encoding (computed here from rf_core directly),
--prompt-at counts from the start of the output, and bad input is one line that says what to pass."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rf_core.cli import main
from rf_core.config import StreamConfig
from rf_core.io.video import Mp4Writer, read_video_frames
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt
from rf_core.vae.stream_decode import WanStreamDecoder
from rf_core.vae.wan_vae import WanVAE, WanVAEConfig

SEED = 2
TINY = ["--model", "tiny-random", "--seed", str(SEED), "--width", "32", "--height", "32", "--png"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def error_line(rc: int, err: str) -> str:
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("reward-forcing generate: error: "), err
    return lines[0]


def pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))])


def expected_frames(opening: np.ndarray, switches: dict[int, str], chunks: int) -> np.ndarray:
    """What tiny-random makes after ``opening`` (uint8 [F, 32, 32, 3]), from rf_core directly: its random
    model, prompt and VAE (seeded as the CLI documents), the prefix encoded and prefilled, the decoder
    primed with it; ``switches``: generated chunk -> prompt."""
    model = random_model("tiny", seed=SEED)
    cfg = model.cfg

    def prompt(text: str) -> torch.Tensor:
        return random_prompt(
            cfg, tokens=min(cfg.text_len, 1 + len(text.split())), seed=zlib.crc32(text.encode())
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vae = WanVAE(WanVAEConfig(dim=8)).eval()
    frames = torch.from_numpy(opening).float().div(255).permute(0, 3, 1, 2)[None]
    with torch.no_grad():
        prefix = vae.encode_frames(frames)
    session = StreamSession(model, prompt("x"), (4, 4), StreamConfig(), seed=SEED)
    session.prefill(prefix)
    decoder = WanStreamDecoder(vae)
    decoder.decode_chunk(prefix)
    out = []
    for c in range(chunks):
        if c in switches:
            session.set_prompt(prompt(switches[c]))
        out.append(decoder.decode_chunk(session.next_chunk()))
    video = torch.cat(out, dim=1)[0].permute(0, 2, 3, 1)
    return (video * 255).round().to(torch.uint8).numpy()


def test_image_is_the_first_frame_and_the_video_goes_on_from_it(tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # wider than the video
    Image.fromarray(image).save(tmp_path / "start.png")
    out = tmp_path / "frames"
    rc, err = run(
        capsys,
        "generate",
        *TINY,
        "--image",
        tmp_path / "start.png",
        "--prompt",
        "x",
        "--frames",
        "12",
        "--out",
        out,
    )
    assert rc == 0, err
    assert f"--image {tmp_path / 'start.png'} is 48x32, the video 32x32: centre-cropped to 32x32" in err
    frames = pngs(out)
    assert frames.shape == (13, 32, 32, 3)
    opening = image[None, :, 8:40]  # its middle 32 columns
    assert np.array_equal(frames[:1], opening)
    new = expected_frames(opening, {}, chunks=1)
    assert np.abs(frames[1:].astype(int) - new.astype(int)).max() <= 1


def test_extend_opens_with_the_video_and_prompt_times_count_from_its_start(tmp_path, capsys):
    video = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    with Mp4Writer(tmp_path / "in.mp4", fps=16) as w:
        w.write(video)
    read = read_video_frames(tmp_path / "in.mp4")  # what the video holds after H.264
    out = tmp_path / "frames"
    # 7 frames -> the last 5 are kept (2 latent frames, one prefill chunk, output frames 0..4); the
    # generated chunks start at frames 5 and 17: 17f switches before the second
    argv = ["--extend", tmp_path / "in.mp4", "--prompt", "x", "--prompt-at", "17f", "y", "--frames", "24"]
    rc, err = run(capsys, "generate", *TINY, *argv, "--out", out)
    assert rc == 0, err
    assert "its first 2 frames are left out (5 kept)" in err
    frames = pngs(out)
    assert frames.shape == (5 + 24, 32, 32, 3)
    assert np.array_equal(frames[:5], read[2:])
    new = expected_frames(read[2:], {1: "y"}, chunks=2)
    assert np.abs(frames[5:].astype(int) - new.astype(int)).max() <= 1
    assert not np.array_equal(new, expected_frames(read[2:], {}, chunks=2))  # the switch shows


def test_bad_inputs_are_one_line_saying_what_to_pass(tmp_path, capsys):
    files = {name: tmp_path / name for name in ("model.pt", "taew2_1.pth", "p.safetensors", "clip.mp4")}
    for path in files.values():
        path.write_bytes(b"not really")
    Image.new("RGB", (8, 8)).save(tmp_path / "start.png")
    real = ["--model", files["model.pt"], "--prompt-embeds", files["p.safetensors"], "--prompt", "x"]
    taehv = ["--decoder", "taehv", "--taehv", files["taew2_1.pth"]]
    rc, err = run(
        capsys, "generate", *real, *taehv, "--image", tmp_path / "start.png", "--out", tmp_path / "o.mp4"
    )
    assert "--vae FILE is needed (Wan VAE, which encodes --image)" in error_line(rc, err)
    rc, err = run(
        capsys, "generate", *TINY, "--prompt", "x", "--image", files["clip.mp4"], "--out", tmp_path / "f"
    )
    assert f"--image {files['clip.mp4']}: not an image file" in error_line(rc, err)
    rc, err = run(
        capsys, "generate", *TINY, "--prompt", "x", "--extend", files["clip.mp4"], "--out", tmp_path / "f"
    )
    assert f"--extend {files['clip.mp4']}: not a video file ffmpeg can read" in error_line(rc, err)
    both = ["--image", tmp_path / "start.png", "--extend", files["clip.mp4"]]
    rc, err = run(capsys, "generate", *TINY, "--prompt", "x", *both, "--out", tmp_path / "f")
    assert "argument --extend: not allowed with argument --image" in err
    video = tmp_path / "in.mp4"
    with Mp4Writer(video, fps=16) as w:
        w.write(np.zeros((17, 32, 32, 3), np.uint8))
    rc, err = run(
        capsys,
        "generate",
        "--model",
        "tiny-random",
        "--prompt",
        "x",
        "--extend",
        video,
        "--out",
        video,
        "--overwrite",
    )
    assert f"is the --extend file {video}; an input is never overwritten" in error_line(rc, err)
    # 17 frames = 5 latent frames, prefilled in chunks starting at frames 0 and 9: no switch at 5f
    at = ["--prompt-at", "5f", "y"]
    rc, err = run(capsys, "generate", *TINY, "--prompt", "x", "--extend", video, *at, "--out", tmp_path / "f")
    assert "--prompt-at 5f: time '5f' falls inside the input video" in error_line(rc, err)
    assert not (tmp_path / "f").exists() and video.stat().st_size > 0
