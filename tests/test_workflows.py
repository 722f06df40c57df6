"""Each example workflow: its UI file matches its API twin, and the API twin runs end to end through a
small stand-in executor with tiny synthetic models (real file formats, real loaders), giving the
expected frame counts, LATENT layout and Wan 2.1 normalisation; the image-to-video, extension and
storyboard workflows give the engine's own prefilled or prompt-switched stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from graph_executor import GraphExecutor, PromptError, load_api_workflow, override
from native_stand_ins import NATIVE, FakeCLIP, LoadImage, VAELoader
from PIL import Image
from workflow_format import ui_to_api

from rf_core.config import StreamConfig
from rf_core.io.checkpoints import load_dit
from rf_core.io.video import Mp4Writer, read_video_frames
from rf_core.stream import StreamSession

ROOT = Path(__file__).resolve().parents[1]
NAMES = [
    "reward_forcing_t2v_5s",
    "reward_forcing_long_video_30s",
    "reward_forcing_interactive_session",
    "reward_forcing_taehv_preview",
    "reward_forcing_image_to_video",
    "reward_forcing_extend_video",
    "reward_forcing_storyboard",
]
# ComfyUI's Wan21 latent statistics, written out independently of the code under test.
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


def wan21_process_out(z: torch.Tensor) -> torch.Tensor:
    """Model-space frame-major [B, T, 16, h, w] -> ComfyUI raw LATENT [B, 16, T, h, w]."""
    mean = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
    return z.permute(0, 2, 1, 3, 4) * std + mean


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def input_dir(tmp_path):
    """ComfyUI's input folder with the files the image-to-video and extension workflows load: a start
    image and a 19-frame video, both 48x32 (wider than the 32x32 the tests generate)."""
    folder = tmp_path / "input"
    folder.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(
        folder / "reward_forcing_start.png"
    )
    with Mp4Writer(folder / "reward_forcing_extend.mp4", fps=16) as w:
        w.write(rng.integers(0, 256, (19, 32, 48, 3), dtype=np.uint8))
    LoadImage.folder["value"] = folder
    yield folder
    LoadImage.folder["value"] = None


@pytest.fixture
def executor(rf_pack, rf_model_dir, rf_output_dir, input_dir):
    VAELoader.folder["value"] = rf_model_dir / "vae"
    rf_pack.nodes.stream.registry.REGISTRY.free_all()
    yield GraphExecutor({**NATIVE, **rf_pack.NODE_CLASS_MAPPINGS})
    rf_pack.nodes.stream.registry.REGISTRY.free_all()


def workflow(name: str, **changes) -> dict:
    return override(load_api_workflow(ROOT / "tests" / "workflows_api" / f"{name}.json"), changes)


def engine_latents(
    model_dir: Path, prompts: list, hw, seed: int, recache: bool = True, prefix: torch.Tensor | None = None
):
    """The engine run directly: [(chunks, prompt text[, recache])] in order, prompts padded to the model's
    32 tokens, after prefilling ``prefix`` (model space) if given."""
    dit = load_dit(model_dir / "diffusion_models" / "rewardforcing.pt", dtype=torch.float32)
    chunks = []
    session = None
    for n, text, *switch_recache in prompts:
        embeds = FakeCLIP().encode(text)[:, : dit.cfg.text_len]
        if session is None:
            session = StreamSession(dit, embeds, hw, StreamConfig(), seed=seed)
            if prefix is not None:
                session.prefill(prefix)
        else:
            session.set_prompt(embeds, recache=switch_recache[0] if switch_recache else recache)
        chunks += [session.next_chunk() for _ in range(n)]
    return torch.cat(chunks, dim=1)


def wan21_process_in(raw: torch.Tensor) -> torch.Tensor:
    """ComfyUI raw LATENT [B, 16, T, h, w] -> model-space frame-major [B, T, 16, h, w]."""
    mean = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
    return ((raw - mean) / std).permute(0, 2, 1, 3, 4)


def mp4_frames(tmp_path: Path, entry: dict) -> int:
    return len(read_video_frames(tmp_path / "output" / entry["subfolder"] / entry["filename"]))


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_its_api_twin(rf_pack, name):
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = load_api_workflow(ROOT / "tests" / "workflows_api" / f"{name}.json")
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(ui, rf_pack.NODE_CLASS_MAPPINGS) == expected


def test_t2v_5s_latent_is_raw_wan21_and_frames_match_native_decode(executor, rf_model_dir):
    prompt = workflow("reward_forcing_t2v_5s", **{"5": {"width": 32, "height": 32}})
    out = executor.execute(prompt)
    latent, images = out["5"]
    samples = latent["samples"]
    assert (
        samples.shape == (1, 16, 21, 4, 4) and samples.dtype == torch.float32 and samples.device.type == "cpu"
    )
    expected = engine_latents(rf_model_dir, [(7, prompt["2"]["inputs"]["text"])], (4, 4), seed=42)
    torch.testing.assert_close(samples, wan21_process_out(expected), rtol=1e-5, atol=1e-5)
    # 5 s = 81 frames, decoded chunk by chunk through the VAE object; a whole-video VAE Decode of the
    # LATENT must give the same frames.
    assert images.shape == (81, 32, 32, 3)
    whole = NATIVE["VAEDecode"]().decode(latent, out["4"][0])[0]
    torch.testing.assert_close(images, whole, rtol=0, atol=1e-5)
    assert executor.ui["7"]["frames"] == [81]


def test_long_30s_writes_the_mp4_while_generating(executor, tmp_path):
    out = executor.execute(workflow("reward_forcing_long_video_30s", **{"6": {"width": 16, "height": 16}}))
    latent, images = out["6"]
    assert latent["samples"].shape == (1, 16, 120, 2, 2)
    assert images.shape == (477, 16, 16, 3)
    (entry,) = executor.ui["6"]["images"]
    assert entry["subfolder"] == "RewardForcing" and entry["filename"].startswith("long_30s_")
    assert mp4_frames(tmp_path, entry) == 477


def test_taehv_preview_same_latent_as_t2v_and_81_frames(executor, tmp_path):
    size = {"width": 32, "height": 32}
    fast = executor.execute(workflow("reward_forcing_taehv_preview", **{"5": size}))["5"]
    (entry,) = executor.ui["5"]["images"]
    assert mp4_frames(tmp_path, entry) == 81
    assert fast[1].shape == (81, 32, 32, 3)
    assert 0 <= fast[1].min() and fast[1].max() <= 1
    # Same prompt, seed and size as the 5 s workflow: the decoder must not change the latent.
    exact = executor.execute(workflow("reward_forcing_t2v_5s", **{"5": size}))["5"]
    torch.testing.assert_close(fast[0]["samples"], exact[0]["samples"], rtol=0, atol=0)


def test_session_continues_across_runs_and_other_workflows_and_switches_prompt(
    executor, rf_model_dir, tmp_path
):
    size = {"width": 32, "height": 32}
    first = workflow("reward_forcing_interactive_session", **{"5": size})
    text_a = first["2"]["inputs"]["text"]
    out1 = executor.execute(first)
    assert out1["5"][0]["samples"].shape[2] == 12 and out1["5"][1].shape[0] == 45  # 4 chunks
    # An identical second queue run must still continue the stream (IS_CHANGED), ...
    out2 = executor.execute(first)
    assert "5" in executor.executed
    assert out2["5"][0]["samples"].shape[2] == 24 and out2["5"][1].shape[0] == 93
    # ... also after another workflow ran in between (ComfyUI then drops every cached output) ...
    executor.execute(workflow("reward_forcing_taehv_preview", **{"5": size}))
    text_b = "The paper boat sails into a bright harbour full of sailboats"
    switched = override(first, {"2": {"text": text_b}})
    out3 = executor.execute(switched)
    samples = out3["5"][0]["samples"]
    assert samples.shape[2] == 36 and out3["5"][1].shape[0] == 1 + 4 * 35
    # ... and the whole video equals the engine run directly with the prompt switched (re-cached) at chunk 8.
    expected = engine_latents(rf_model_dir, [(8, text_a), (4, text_b)], (4, 4), seed=3, recache=True)
    torch.testing.assert_close(samples, wan21_process_out(expected), rtol=1e-5, atol=1e-5)
    (entry,) = executor.ui["6"]["images"]
    assert mp4_frames(tmp_path, entry) == 141


def test_workflow_validation_reports_bad_size_at_queue_time(executor):
    with pytest.raises(PromptError, match="width 830 is not a positive multiple of 16: use 816 or 832"):
        executor.execute(workflow("reward_forcing_t2v_5s", **{"5": {"width": 830}}))


def test_image_to_video_opens_with_the_image_and_streams_on_from_its_encoding(
    executor, rf_model_dir, input_dir
):
    out = executor.execute(workflow("reward_forcing_image_to_video", **{"6": {"width": 32, "height": 32}}))
    latent, images = out["6"]
    image = torch.from_numpy(np.array(Image.open(input_dir / "reward_forcing_start.png"))).float() / 255
    fitted = image[None, :, 8:40]  # 48x32 into 32x32: the middle 32 columns, no resizing
    assert images.shape == (1 + 84, 32, 32, 3) and torch.equal(images[:1], fitted)  # 5 s of new frames
    raw = out["4"][0].encode(fitted)  # the VAE object's encode, as VAE Encode calls it
    samples = latent["samples"]
    assert samples.shape == (1, 16, 1 + 21, 4, 4)
    torch.testing.assert_close(samples[:, :, :1], raw, rtol=0, atol=1e-5)
    text = workflow("reward_forcing_image_to_video")["2"]["inputs"]["text"]
    expected = engine_latents(rf_model_dir, [(7, text)], (4, 4), seed=42, prefix=wan21_process_in(raw))
    torch.testing.assert_close(samples[:, :, 1:], wan21_process_out(expected), rtol=1e-5, atol=1e-5)
    assert executor.ui["8"]["frames"] == [85]
    assert "start_image is 48x32, the video 32x32: centre-cropped to 32x32" in executor.ui["6"]["text"]


def test_extend_video_opens_with_its_frames_and_writes_them_to_the_mp4(executor, tmp_path, input_dir):
    out = executor.execute(workflow("reward_forcing_extend_video", **{"7": {"width": 32, "height": 32}}))
    latent, images = out["7"]
    read = torch.from_numpy(read_video_frames(input_dir / "reward_forcing_extend.mp4")).float() / 255
    kept = read[2:, :, 8:40]  # 19 frames: the last 17 (1 + 4 * 4), their middle 32 columns
    assert images.shape == (17 + 84, 32, 32, 3) and torch.equal(images[:17], kept)
    assert latent["samples"].shape == (1, 16, 5 + 21, 4, 4)
    torch.testing.assert_close(latent["samples"][:, :, :5], out["4"][0].encode(kept), rtol=0, atol=1e-5)
    (entry,) = executor.ui["7"]["images"]
    assert entry["filename"].startswith("extended_") and mp4_frames(tmp_path, entry) == 101
    assert executor.ui["7"]["text"] == [
        "17 input frames + 84 new: 101 frames (6.31 s at 16 fps); 80 new frames asked, rounded up to whole chunks",
        "extend has 19 frames; the Wan VAE encodes 1 + 4k, so its first 2 frames are left out (17 kept)",
        "extend is 48x32, the video 32x32: centre-cropped to 32x32",
    ]


def test_storyboard_switches_prompts_at_its_times(executor, rf_model_dir):
    prompt = workflow("reward_forcing_storyboard", **{"5": {"width": 32, "height": 32}})
    out = executor.execute(prompt)
    samples = out["5"][0]["samples"]
    assert samples.shape == (1, 16, 51, 4, 4) and out["5"][1].shape == (201, 32, 32, 3)  # 12 s -> 17 chunks
    lines = [line.split(": ", 1)[1] for line in prompt["2"]["inputs"]["text"].splitlines()]
    # 3 s = frame 48 -> chunk 5 (frames 57..), 6 s = frame 96 -> chunk 9 (105..), 9 s = 144 -> chunk 13 (153..)
    parts = [(5, lines[0]), (4, lines[1], True), (4, lines[2], True), (4, lines[3], False)]
    expected = engine_latents(rf_model_dir, parts, (4, 4), seed=42)
    torch.testing.assert_close(samples, wan21_process_out(expected), rtol=1e-5, atol=1e-5)
    assert executor.ui["7"]["frames"] == [201]
