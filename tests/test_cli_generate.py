"""`reward-forcing generate`: the offline tiny path end to end, and clear errors."""

import re

import pytest

from rf_core.cli import main
from rf_core.io.video import probe_video


def test_tiny_random_png_sequence_with_prompt_switch(tmp_path, capsys):
    out = tmp_path / "frames"
    rc = main(
        [
            "generate",
            "--model",
            "tiny-random",
            "--prompt",
            "a",
            "--prompt-at",
            "1c",
            "b",
            "--frames",
            "21",
            "--width",
            "64",
            "--height",
            "48",
            "--png",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert len(sorted(out.glob("*.png"))) == 21  # chunk 0: 9 frames, chunk 1: 12
    assert "makes noise" in capsys.readouterr().err


def test_tiny_random_mp4(tmp_path):
    out = tmp_path / "v.mp4"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-random",
                "--prompt",
                "x",
                "--frames",
                "9",
                "--width",
                "64",
                "--height",
                "48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    info = probe_video(out)
    assert (info.frames, info.width, info.height) == (9, 64, 48)


def test_missing_model_file_says_how_to_get_it(tmp_path, capsys):
    rc = main(
        ["generate", "--model", str(tmp_path / "nope.pt"), "--prompt", "x", "--out", str(tmp_path / "v.mp4")]
    )
    assert rc == 2
    assert re.search(r"--model .*nope\.pt: .*not found.*reward-forcing download", capsys.readouterr().err)
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--width", "100"], "argument --width: expected a positive multiple of 16"),
        (["--window", "4"], "--window 4 / --sink 3: window_frames 4 must be >= sink_frames"),
        (["--prompt-at", "soon", "y"], "--prompt-at soon: cannot read time"),
        (["--frames", "0"], "argument --frames: expected a whole number >= 1, got '0'"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, capsys, extra, match):
    argv = ["generate", "--model", "tiny-random", "--prompt", "x", "--out", str(tmp_path / "v.mp4"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("reward-forcing generate: error: ") and match in err
