"""Prompt Timeline (issue 15): its lines become prompt switches on Stream Generate at the chunks the CLI's
--prompt-at gives, equal to the engine switching prompts itself; bad lines and impossible times are
refused, before the model loads, naming the line."""

from __future__ import annotations

import pytest
import torch
from native_stand_ins import FakeCLIP

from rf_core.config import StreamConfig
from rf_core.io.checkpoints import load_dit
from rf_core.stream import StreamSession
from rf_core.vae.latent_format import from_comfy_latent, to_comfy_latent

GEN = {"seed": 3, "length_unit": "frames", "width": 32, "height": 32, "steps": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nodes(rf_pack, rf_model_dir, rf_output_dir):
    return rf_pack.nodes


def timeline(nodes, text: str, recache: bool = True):
    return nodes.prompts.timeline.RewardForcingPromptTimeline().build(FakeCLIP(), text, recache)[0]


def embeds(text: str) -> torch.Tensor:
    return FakeCLIP().encode(text)[:, :32]  # the tiny model takes 32 tokens


def generate(nodes, length: int, **kw) -> torch.Tensor:
    model = nodes.load.loaders.RewardForcingLoadModel().load("rewardforcing.pt")[0]
    out = nodes.stream.generate.RewardForcingStreamGenerate().generate(
        model, **{**GEN, "length": length, **kw}
    )
    return out["result"][0]["samples"]


def engine(rf_model_dir, opening: str, steps: list, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The engine switching prompts itself. steps: [(prompt or None, recache)] per generated chunk."""
    dit = load_dit(rf_model_dir / "diffusion_models" / "rewardforcing.pt", dtype=torch.float32)
    session = StreamSession(dit, embeds(opening), (4, 4), StreamConfig(), seed=3)
    if prefix is not None:
        session.prefill(prefix)
    chunks = []
    for prompt, recache in steps:
        if prompt is not None:
            session.set_prompt(embeds(prompt), recache=recache)
        chunks.append(session.next_chunk())
    return to_comfy_latent(torch.cat(chunks, dim=1))


def test_timeline_lines_switch_prompts_at_their_chunks(nodes, rf_model_dir):
    # 45 frames = chunks starting at frames 0, 9, 21, 33: 9f -> chunk 1, 1.2 s = frame 19.2 -> chunk 2, 3c
    text = "# storyboard\n0s: a fox in snow\n\n9f: the fox runs\n1.2s (no recache): the fox jumps\n3c: the fox sleeps"
    latent = generate(nodes, 45, timeline=timeline(nodes, text))
    expected = engine(
        rf_model_dir,
        "a fox in snow",
        [(None, True), ("the fox runs", True), ("the fox jumps", False), ("the fox sleeps", True)],
    )
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)


def test_positive_opens_and_the_timeline_switches_with_its_recache_default(nodes, rf_model_dir):
    positive = [[FakeCLIP().encode("a fox in snow"), {"pooled_output": None}]]
    latent = generate(
        nodes, 21, positive=positive, timeline=timeline(nodes, "1c: the fox runs", recache=False)
    )
    expected = engine(rf_model_dir, "a fox in snow", [(None, True), ("the fox runs", False)])
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)


def test_times_count_from_the_start_of_the_output_with_an_extended_video(nodes, rf_model_dir):
    opening = generate(
        nodes, 21, timeline=timeline(nodes, "0s: a fox in snow")
    )  # 6 latents, 2 prefill chunks
    # chunk 2 is the first generated one (output frames 21..32); 2.1 s = frame 33.6 -> chunk 4 (frames 45..)
    tl = timeline(nodes, "0s: a fox in snow\n2c: the fox runs\n2.1s: the fox sleeps")
    latent = generate(nodes, 36, timeline=tl, extend={"samples": opening})
    expected = engine(
        rf_model_dir,
        "a fox in snow",
        [("the fox runs", True), (None, True), ("the fox sleeps", True)],
        prefix=from_comfy_latent(opening),
    )
    torch.testing.assert_close(latent[:, :, 6:], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "text, kw, message",
    [
        (
            "0s: a\n1c: b",
            {"positive": True},
            r"positive and timeline line 1 \(0s: 'a'\) both give the opening",
        ),
        ("1c: b", {}, "the timeline starts at 1c and positive is not connected: add a '0s: PROMPT' line"),
        (
            "0s: a\n1f: b\n9f: c",
            {},
            r"timeline line 3 \(9f: 'c'\) and timeline line 2 \(1f: 'b'\) both start at chunk 1",
        ),
        (
            "0s: a\n2c: b",
            {},
            r"timeline line 2 \(2c: 'b'\): the switch would come at video frame 21, after the video's end \(21 frames",
        ),
        (
            "0s: a\n1c: b",
            {"extend": True},
            r"timeline line 2 \(1c: 'b'\): time '1c' falls inside the input video",
        ),
    ],
)
def test_impossible_timelines_are_refused_before_the_model_loads(nodes, text, kw, message):
    gen = nodes.stream.generate.RewardForcingStreamGenerate()
    inputs = {**GEN, "length": 12, "model": None, "timeline": timeline(nodes, text)}
    if kw.get("positive"):
        inputs["positive"] = [[FakeCLIP().encode("a"), {"pooled_output": None}]]
    if kw.get("extend"):
        inputs["extend"] = {"samples": torch.zeros(1, 16, 6, 4, 4)}
    with pytest.raises(ValueError, match=message):
        gen.check_lazy_status(**inputs)


def test_the_prompts_are_asked_for_first_and_the_model_only_once_the_times_fit(nodes):
    gen = nodes.stream.generate.RewardForcingStreamGenerate()
    pending = {**GEN, "length": 21, "model": None, "timeline": None, "vae": None}
    assert gen.check_lazy_status(**pending) == ["timeline"]
    assert gen.check_lazy_status(**{**pending, "timeline": timeline(nodes, "0s: a\n1c: b")}) == [
        "model",
        "vae",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("0s a fox", r"text line 1: '0s a fox' is not 'TIME: PROMPT'"),
        ("0s: a\nsoon: b", r"text line 2: 'soon: b' is not 'TIME: PROMPT'"),
        ("0s:", "is not 'TIME: PROMPT'"),
        ("# only a comment\n", "text holds no prompt line"),
    ],
)
def test_bad_lines_are_refused_when_queued(rf_pack, text, message):
    cls = rf_pack.NODE_CLASS_MAPPINGS["RewardForcingPromptTimeline"]
    with pytest.raises(ValueError, match=message):
        cls.VALIDATE_INPUTS(text=text)
    assert cls.VALIDATE_INPUTS(text=cls.INPUT_TYPES()["required"]["text"][1]["default"]) is True


def test_each_prompt_is_encoded_once_as_clip_text_encode_does(nodes):
    calls = []

    class CountingCLIP(FakeCLIP):
        def tokenize(self, text):
            calls.append(text)
            return super().tokenize(text)

    tl = nodes.prompts.timeline.RewardForcingPromptTimeline().build(CountingCLIP(), "0s: a\n1c: b\n2c: a")[0]
    assert calls == ["a", "b"]
    assert [(c.time, c.prompt, c.recache) for c in tl.cues] == [
        ("0s", "a", True),
        ("1c", "b", True),
        ("2c", "a", True),
    ]
    assert torch.equal(tl.cues[0].conditioning[0][0], FakeCLIP().encode("a"))
