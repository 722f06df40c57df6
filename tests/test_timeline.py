import pytest

from rf_core.timeline import build_timeline, chunk_start_frame, latent_frames_for, parse_time


def test_chunk_start_frames_by_hand():
    # chunk 0 -> frames 0..8 (9 frames), chunk 1 -> 9..20, chunk 2 -> 21..32
    assert [chunk_start_frame(c) for c in range(4)] == [0, 9, 21, 33]


def test_parse_time_units():
    assert parse_time("0s", 16) == 0
    assert parse_time("9f", 16) == 1 and parse_time("10f", 16) == 2
    assert parse_time("1s", 16) == 2  # frame 16 -> first chunk starting at/after it is chunk 2 (frame 21)
    assert parse_time("3c", 16) == 3
    with pytest.raises(ValueError, match="cannot read time"):
        parse_time("ten", 16)


def test_timeline_and_lengths():
    tl = build_timeline("a", [("2c", "b"), ("1c", "c"), ("2c", "d")], fps=16)
    assert [(x.chunk, x.prompt) for x in tl] == [(0, "a"), (1, "c"), (2, "d")]
    assert latent_frames_for(81) == 21 and latent_frames_for(80) == 21 and latent_frames_for(477) == 120
    assert latent_frames_for(1) == 3
    with pytest.raises(ValueError):
        latent_frames_for(0)
