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


def test_chunks_after_a_prefix_by_hand():
    # 17 input frames = 5 latent frames, prefilled as chunks [0-2] (frames 0..8) and [3-4] (frames 9..16);
    # the generated chunks start at latent 5, 8, 11: frames 17, 29, 41.
    assert [chunk_start_frame(c, prefix=5) for c in range(5)] == [0, 9, 17, 29, 41]
    assert parse_time("0s", 16, prefix=5) == 0  # the opening prompt, also for the prefill
    assert parse_time("10f", 16, prefix=5) == 2 and parse_time("17f", 16, prefix=5) == 2
    assert parse_time("18f", 16, prefix=5) == 3 and parse_time("2c", 16, prefix=5) == 2
    # a start image (1 latent frame) is chunk 0; the first generated chunk, frames 1..12, is chunk 1
    assert [chunk_start_frame(c, prefix=1) for c in range(3)] == [0, 1, 13]
    assert parse_time("1f", 16, prefix=1) == 1 and parse_time("13f", 16, prefix=1) == 2
    assert parse_time("1s", 16, prefix=1) == 3  # frame 16 -> chunk 3, starting at frame 25


@pytest.mark.parametrize("time", ["1f", "9f", "0.5s", "1c"])
def test_a_switch_during_the_prefill_is_refused(time):
    with pytest.raises(ValueError, match=r"falls inside the input video .* after frame 9 \(0.56 s\), or 2c"):
        parse_time(time, 16, prefix=5)


def test_lengths_after_a_prefix_count_new_frames():
    # 4 new frames per latent frame after a prefix, in whole chunks of 3
    assert latent_frames_for(12, prefix=1) == 3 and latent_frames_for(13, prefix=1) == 6
    assert latent_frames_for(80, prefix=9) == 21 and latent_frames_for(1, prefix=9) == 3
    tl = build_timeline("a", [("1c", "b")], fps=16, prefix=1)
    assert [(x.chunk, x.prompt) for x in tl] == [(0, "a"), (1, "b")]
