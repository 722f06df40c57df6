"""generate --profile: runs the profile's model and decoder settings; refusals are one line."""

from __future__ import annotations

import sys

import pytest

from rf_core.cli import main
from rf_core.io.video import probe_video

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["generate", "--model", "tiny-random", "--prompt", "a fox", "--frames", "9"]


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_low_vram_profile_streams_the_blocks_and_writes_the_video(tmp_path, capsys, monkeypatch):
    import rf_core.profiles as profiles

    applied = []
    original = profiles.apply_profile
    monkeypatch.setattr(
        profiles, "apply_profile", lambda m, *a, **k: applied.append(o := original(m, *a, **k)) or o
    )
    rc, err = run(capsys, *TINY, "--profile", "low-vram", "--out", str(tmp_path / "v.mp4"))
    assert rc == 0, err
    assert [i.name for i in applied] == ["low-vram"]
    assert probe_video(tmp_path / "v.mp4").frames == 9


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--profile", "turbo"], "sageattention"),
        (["--profile", "low-vram", "--fp8"], "--profile low-vram and --fp8"),
        (["--profile", "fastest"], "--profile"),
    ],
)
def test_profile_refusals_are_one_line(tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setitem(sys.modules, "sageattention", None)
    rc, err = run(capsys, *TINY, *extra, "--out", str(tmp_path / "v.mp4"))
    lines = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "v.mp4").exists()
