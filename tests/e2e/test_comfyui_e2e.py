"""The pack inside a real ComfyUI (opt-in): set RF_COMFYUI_DIR to a ComfyUI checkout and, if its
Python is not this one, RF_COMFYUI_PYTHON to the interpreter of its environment (see docs/nodes.md).

ComfyUI runs headless on the CPU with the repository linked into custom_nodes and tiny synthetic
model files (tests/e2e/synthetic_models.py). Every example workflow's API twin is queued over HTTP;
the tensors that matter are saved by a test-only probe pack and compared here with rf_core run
directly and with an independent decoder.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_server import PACK_FOLDER, REPO, ComfyServer, WebSocket, messages
from graph_executor import load_api_workflow, override
from synthetic_models import CLIP_NAME, LORA_NAME, write_models
from workflow_format import NATIVE_WIDGETS

from rf_core.config import StreamConfig
from rf_core.io.checkpoints import load_dit
from rf_core.io.video import Mp4Writer, read_video_frames
from rf_core.stream import StreamSession
from rf_core.vae.latent_format import from_comfy_latent
from rf_core.vae.wan_vae import load_wan_vae

COMFY_DIR = os.environ.get("RF_COMFYUI_DIR")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not COMFY_DIR, reason="opt-in: set RF_COMFYUI_DIR to a ComfyUI checkout"),
]
WORKFLOWS = REPO / "tests" / "workflows_api"
SIZE = {"width": 16, "height": 16}
# Wan21 latent statistics, written out independently of the code under test.
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


def write_inputs(folder: Path) -> None:
    """The files the image-to-video and extension workflows load from ComfyUI's input folder: a 24x16
    start image and an 11-frame 24x16 video (wider than the 16x16 the tests generate)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(
        folder / "reward_forcing_start.png"
    )
    with Mp4Writer(folder / "reward_forcing_extend.mp4", fps=16) as w:
        w.write(rng.integers(0, 256, (11, 16, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    write_models(base / "models")
    write_inputs(base / "input")
    srv = ComfyServer(Path(COMFY_DIR), os.environ.get("RF_COMFYUI_PYTHON", sys.executable), base)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server_without_cache(server, tmp_path_factory):
    """A second ComfyUI with --cache-none: every node runs every time, nothing is kept between runs."""
    base = tmp_path_factory.mktemp("comfy_base_nocache")
    (base / "models").symlink_to(server.base / "models", target_is_directory=True)
    srv = ComfyServer(server.comfy_dir, server.python, base, ("--cache-none",))
    srv.start()
    yield srv
    srv.stop()


def api(name: str, **changes) -> dict:
    """An API twin with the synthetic text encoder and a small size."""
    prompt = load_api_workflow(WORKFLOWS / f"{name}.json")
    return override(prompt, {"1": {"clip_name": CLIP_NAME, "type": "stable_diffusion"}, **changes})


def probe(prompt: dict, kind: str, source: list, name: str) -> None:
    prompt[f"p_{name}"] = {"class_type": f"RFProbeSave{kind}", "inputs": {"value": source, "name": name}}


def probed(server: ComfyServer, name: str) -> torch.Tensor:
    return torch.load(server.output / "probe" / f"{name}.pt", weights_only=True)


def outputs_of(entry: dict, node: str) -> list[dict]:
    return entry["outputs"][node]["images"]


def mp4_frames(server: ComfyServer, item: dict) -> int:
    return len(read_video_frames(server.output / item["subfolder"] / item["filename"]))


def engine_latent(
    server: ComfyServer, parts: list, seed: int, hw=(2, 2), prefix: torch.Tensor | None = None, **kw
):
    """rf_core run directly: [(chunks, CONDITIONING tensor[, recache])] in order, each padded to 512 tokens,
    after prefilling ``prefix`` (a raw LATENT) if given; the generated chunks as raw LATENT."""
    dit = load_dit(server.base / "models" / "diffusion_models" / "rewardforcing.pt", dtype=torch.float32)
    mean = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
    chunks, session = [], None
    for n, cond, *recache in parts:
        embeds = torch.nn.functional.pad(cond, (0, 0, 0, 512 - cond.shape[1]))
        if session is None:
            session = StreamSession(dit, embeds, hw, StreamConfig(**kw), seed=seed)
            if prefix is not None:
                session.prefill(((prefix - mean) / std).permute(0, 2, 1, 3, 4))
        else:
            session.set_prompt(embeds, recache=recache[0] if recache else True)
        chunks += [session.next_chunk() for _ in range(n)]
    z = torch.cat(chunks, dim=1)
    return z.permute(0, 2, 1, 3, 4) * std + mean


# ----------------------------------------------------------------------------- registration
def test_every_node_is_registered_as_declared(server, rf_pack):
    failed = [line for line in server.log().splitlines() if "IMPORT FAILED" in line]
    assert not any(PACK_FOLDER in line for line in failed), failed
    info = server.get("/object_info")
    for name, cls in rf_pack.NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} missing from /object_info"
        node = info[name]
        spec = cls.INPUT_TYPES()
        assert node["python_module"] == f"custom_nodes.{PACK_FOLDER}"
        assert (
            node["category"] == cls.CATEGORY
            and node["display_name"] == rf_pack.NODE_DISPLAY_NAME_MAPPINGS[name]
        )
        assert node["input_order"].get("required", []) == list(spec.get("required", {}))
        assert node["input_order"].get("optional", []) == list(spec.get("optional", {}))
        assert node["output"] == list(cls.RETURN_TYPES)
    # The widget orders the UI->API conversion in the unit tests assumes for native nodes.
    for name, widgets in NATIVE_WIDGETS.items():
        order = info[name]["input_order"]
        declared = info[name]["input"]
        names = [
            n for n in order.get("required", []) + order.get("optional", [])
            if isinstance((declared.get("required", {}) | declared.get("optional", {}))[n][0], list)
            or (declared.get("required", {}) | declared.get("optional", {}))[n][0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
        ]  # fmt: skip
        assert names == [w for w, _ in widgets], name


def test_example_workflows_are_listed_as_templates(server):
    templates = server.get("/api/workflow_templates")
    assert set(templates[PACK_FOLDER]) >= {p.stem for p in WORKFLOWS.glob("reward_forcing_*.json")}


# ----------------------------------------------------------------------------- workflows
def test_t2v_5s_latent_decodes_natively_like_our_streaming_decode(server):
    prompt = api("reward_forcing_t2v_5s", **{"5": SIZE})
    prompt["n_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 0]}}
    probe(prompt, "Image", ["n_decode", 0], "t2v_native")
    probe(prompt, "Image", ["5", 1], "t2v_ours")
    probe(prompt, "Latent", ["5", 0], "t2v_latent")
    probe(prompt, "Conditioning", ["2", 0], "t2v_cond")
    entry = server.run(prompt)
    (video,) = outputs_of(entry, "7")
    assert mp4_frames(server, video) == 81
    latent, cond = probed(server, "t2v_latent"), probed(server, "t2v_cond")
    assert cond.shape == (1, 77, 768)  # CLIP-L: the node pads it to the model's 512 tokens
    assert latent.shape == (1, 16, 21, 2, 2) and latent.dtype == torch.float32
    torch.testing.assert_close(latent, engine_latent(server, [(7, cond)], seed=42), rtol=1e-4, atol=1e-4)
    native, ours = probed(server, "t2v_native"), probed(server, "t2v_ours")
    assert native.shape == ours.shape == (81, 16, 16, 3)
    torch.testing.assert_close(ours, native, rtol=0, atol=1e-4)  # chunked with a persistent cache == whole
    vae = load_wan_vae(server.base / "models" / "vae" / "wan_2.1_vae.safetensors", dtype=torch.float32)
    reference = (vae.decode(from_comfy_latent(latent).transpose(1, 2)) + 1) / 2  # an independent decoder
    torch.testing.assert_close(native, reference[0].permute(1, 2, 3, 0).clamp(0, 1), rtol=0, atol=2e-3)


def test_image_to_video_opens_with_the_image_and_streams_on_from_its_encoding(server):
    prompt = api("reward_forcing_image_to_video", **{"6": SIZE})
    probe(prompt, "Image", ["5", 0], "i2v_loaded")
    probe(prompt, "Image", ["6", 1], "i2v_images")
    probe(prompt, "Latent", ["6", 0], "i2v_latent")
    probe(prompt, "Conditioning", ["2", 0], "i2v_cond")
    entry = server.run(prompt)
    (video,) = outputs_of(entry, "8")
    assert mp4_frames(server, video) == 1 + 84
    fitted = probed(server, "i2v_loaded")[:, :, 4:20]  # 24x16 into 16x16: the middle 16 columns
    images, latent = probed(server, "i2v_images"), probed(server, "i2v_latent")
    assert images.shape == (85, 16, 16, 3) and torch.equal(images[:1], fitted)
    assert latent.shape == (1, 16, 22, 2, 2)
    vae = load_wan_vae(server.base / "models" / "vae" / "wan_2.1_vae.safetensors", dtype=torch.float32)
    raw = vae.encode(fitted.permute(3, 0, 1, 2)[None] * 2 - 1, normalize=False)  # an independent encoder
    torch.testing.assert_close(latent[:, :, :1], raw, rtol=1e-4, atol=1e-4)
    expected = engine_latent(server, [(7, probed(server, "i2v_cond"))], seed=42, prefix=latent[:, :, :1])
    torch.testing.assert_close(latent[:, :, 1:], expected, rtol=1e-4, atol=1e-4)


def test_extend_video_opens_with_its_frames(server):
    prompt = api("reward_forcing_extend_video", **{"7": SIZE})
    probe(prompt, "Image", ["6", 0], "extend_loaded")
    probe(prompt, "Image", ["7", 1], "extend_images")
    probe(prompt, "Latent", ["7", 0], "extend_latent")
    probe(prompt, "Conditioning", ["2", 0], "extend_cond")
    entry = server.run(prompt)
    (video,) = outputs_of(entry, "7")
    assert video["subfolder"] == "RewardForcing" and mp4_frames(server, video) == 9 + 84
    loaded = probed(server, "extend_loaded")
    assert loaded.shape == (11, 16, 24, 3)
    kept = loaded[2:, :, 4:20]  # 11 frames: the last 9 (1 + 4 * 2), their middle 16 columns
    images, latent = probed(server, "extend_images"), probed(server, "extend_latent")
    assert images.shape == (93, 16, 16, 3) and torch.equal(images[:9], kept)
    assert latent.shape == (1, 16, 3 + 21, 2, 2)
    expected = engine_latent(server, [(7, probed(server, "extend_cond"))], seed=42, prefix=latent[:, :, :3])
    torch.testing.assert_close(latent[:, :, 3:], expected, rtol=1e-4, atol=1e-4)


def test_storyboard_switches_prompts_at_its_times(server):
    prompt = api("reward_forcing_storyboard", **{"5": SIZE})
    probe(prompt, "Latent", ["5", 0], "storyboard_latent")
    lines = [line.split(": ", 1)[1] for line in prompt["2"]["inputs"]["text"].splitlines()]
    for i, text in enumerate(lines):  # each line's prompt as CLIP Text Encode gives it
        prompt[f"t{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 0]}}
        probe(prompt, "Conditioning", [f"t{i}", 0], f"storyboard_cond{i}")
    entry = server.run(prompt)
    (video,) = outputs_of(entry, "7")
    assert mp4_frames(server, video) == 201  # 12 s -> 17 chunks
    conds = [probed(server, f"storyboard_cond{i}") for i in range(4)]
    # 3 s -> chunk 5, 6 s -> chunk 9, 9 s (no recache) -> chunk 13
    parts = [(5, conds[0]), (4, conds[1], True), (4, conds[2], True), (4, conds[3], False)]
    expected = engine_latent(server, parts, seed=42)
    torch.testing.assert_close(probed(server, "storyboard_latent"), expected, rtol=1e-4, atol=1e-4)


def test_long_30s_writes_477_frames(server):
    entry = server.run(api("reward_forcing_long_video_30s", **{"6": SIZE}), timeout=1200)
    (video,) = outputs_of(entry, "6")
    assert video["subfolder"] == "RewardForcing" and mp4_frames(server, video) == 477


def test_taehv_preview_writes_81_frames(server):
    entry = server.run(api("reward_forcing_taehv_preview", **{"5": SIZE}))
    (video,) = outputs_of(entry, "5")
    assert mp4_frames(server, video) == 81


def test_session_continues_over_queue_runs_other_workflows_and_a_prompt_switch(server):
    prompt = api("reward_forcing_interactive_session", **{"5": {**SIZE, "session_id": "e2e"}})
    probe(prompt, "Conditioning", ["2", 0], "session_cond")
    probe(prompt, "Latent", ["5", 0], "session_latent")
    counts = []
    first = server.run(prompt)
    counts.append(mp4_frames(server, outputs_of(first, "6")[0]))
    cond_a = probed(server, "session_cond")
    second = server.run(prompt)  # identical inputs: must run again
    assert "5" not in [n for m in messages(second, "execution_cached") for n in m["nodes"]]
    counts.append(mp4_frames(server, outputs_of(second, "6")[0]))
    server.run(api("reward_forcing_taehv_preview", **{"5": SIZE}))  # another workflow in between
    switched = override(prompt, {"2": {"text": "a lighthouse at night, waves crashing, stormy sky"}})
    third = server.run(switched)
    counts.append(mp4_frames(server, outputs_of(third, "6")[0]))
    assert counts == [45, 93, 141]
    cond_b = probed(server, "session_cond")
    expected = engine_latent(server, [(8, cond_a), (4, cond_b)], seed=3)
    torch.testing.assert_close(probed(server, "session_latent"), expected, rtol=1e-4, atol=1e-4)


def test_session_survives_with_output_caching_off(server_without_cache):
    srv = server_without_cache
    prompt = api("reward_forcing_interactive_session", **{"5": {**SIZE, "session_id": "nocache"}})
    counts = [mp4_frames(srv, outputs_of(srv.run(prompt), "6")[0]) for _ in range(2)]
    assert counts == [45, 93]


def test_progress_and_a_preview_per_chunk_reach_the_browser(server):
    client_id = uuid.uuid4().hex
    ws = WebSocket(server, client_id)
    try:
        status, body = server.post(
            "/prompt", {"prompt": api("reward_forcing_taehv_preview", **{"5": SIZE}), "client_id": client_id}
        )
        assert status == 200
        running, progress, previews = None, [], 0
        while True:
            kind, msg = ws.receive()
            if kind == "binary":
                event, payload = msg
                if running == "5" and event == 1:  # PREVIEW_IMAGE: 4-byte format (1 = JPEG), then the image
                    assert payload[:4] == b"\x00\x00\x00\x01" and payload[4:6] == b"\xff\xd8"
                    previews += 1
                continue
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, body["prompt_id"]):
                continue
            if msg["type"] == "executing":
                running = data["node"]
                if running is None:
                    break
            elif msg["type"] == "progress" and data["node"] == "5":
                progress.append((data["value"], data["max"]))
            elif msg["type"] == "execution_error":
                raise AssertionError(data)
    finally:
        ws.close()
    assert previews == 7  # one per chunk of the 5 s video; progress: 4 denoising passes per chunk
    assert progress[-1] == (28, 28) and [v for v, _ in progress] == sorted(v for v, _ in progress)


def test_cancel_mid_session_then_continue_consistently(server):
    prompt = api(
        "reward_forcing_interactive_session", **{"5": {**SIZE, "session_id": "cancel", "chunks": 200}}
    )
    del prompt["4"], prompt["5"]["inputs"]["vae"]  # latent previews only: quick chunks
    probe(prompt, "Conditioning", ["2", 0], "cancel_cond")
    probe(prompt, "Latent", ["5", 0], "cancel_latent")
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 120
    while not (server.output / "probe" / "cancel_cond.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # some chunks in
    assert server.post("/interrupt", {})[0] == 200
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "error" and messages(entry, "execution_interrupted")
    server.run(override(prompt, {"5": {"chunks": 2}}))
    latent = probed(server, "cancel_latent")
    total = latent.shape[2]
    assert 6 <= total < 600 and total % 3 == 0
    expected = engine_latent(server, [(total // 3, probed(server, "cancel_cond"))], seed=3)
    torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)


def test_lora_patch_equals_merged_weights_and_base_stays_clean(server):
    gen = {
        "seed": 1,
        "length": 9,
        "length_unit": "frames",
        **SIZE,
        "steps": 4,
        "filename_prefix": "",
        "fps": 16.0,
    }
    load = {"dtype": "auto", "attention": "auto", "placement": "auto"}
    prompt = {
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_NAME, "type": "stable_diffusion"}},
        "2": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a red kite over green hills", "clip": ["1", 0]},
        },
        "3": {"class_type": "RewardForcingLoadModel", "inputs": {"model_name": "rewardforcing.pt", **load}},
        "4": {
            "class_type": "RewardForcingLoRA",
            "inputs": {"model": ["3", 0], "lora_name": LORA_NAME, "strength": 0.7},
        },
        "5": {
            "class_type": "RewardForcingStreamGenerate",
            "inputs": {"model": ["4", 0], "positive": ["2", 0], **gen},
        },
        "6": {"class_type": "RewardForcingLoadModel", "inputs": {"model_name": "merged.safetensors", **load}},
        "7": {
            "class_type": "RewardForcingStreamGenerate",
            "inputs": {"model": ["6", 0], "positive": ["2", 0], **gen},
        },
    }
    probe(prompt, "Latent", ["5", 0], "lora")
    probe(prompt, "Latent", ["7", 0], "merged")
    probe(prompt, "Conditioning", ["2", 0], "lora_cond")
    server.run(prompt)
    torch.testing.assert_close(probed(server, "lora"), probed(server, "merged"), rtol=1e-4, atol=1e-4)
    base = {k: v for k, v in prompt.items() if k in ("1", "2", "3")}
    base["5"] = {
        "class_type": "RewardForcingStreamGenerate",
        "inputs": {"model": ["3", 0], "positive": ["2", 0], **gen},
    }
    probe(base, "Latent", ["5", 0], "base")
    server.run(base)
    expected = engine_latent(server, [(1, probed(server, "lora_cond"))], seed=1)
    torch.testing.assert_close(probed(server, "base"), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"5": {"width": 830}}, "width 830 is not a positive multiple of 16: use 816 or 832"),
        ({"5": {"length": 0}}, "length must be more than 0"),
        ({"3": {"model_name": "missing.pt"}}, "Value not in list"),
    ],
)
def test_bad_inputs_are_refused_at_queue_time(server, changes, message):
    status, body = server.post("/prompt", {"prompt": api("reward_forcing_t2v_5s", **changes)})
    assert status == 400 and message in str(body)
    (node,) = changes
    (error,) = body["node_errors"][node]["errors"]  # once, not under every input VALIDATE_INPUTS names
    assert message in f"{error['message']}: {error['details']}"


def test_a_too_long_global_stream_fails_before_the_model_loads(server):
    # fp32 and a prompt of its own: no output of an earlier test is cached for nodes 2 and 3
    prompt = api(
        "reward_forcing_t2v_5s", **{"2": {"text": "a global stream"}, "3": {"dtype": "fp32"}, "5": SIZE}
    )
    prompt["9"] = {
        "class_type": "RewardForcingStreamSettings",
        "inputs": {
            "sink_policy": "global",
            "sink_frames": 3,
            "window_frames": 9,
            "ema_alpha": 0.999,
            "max_frames": 6,
        },
    }
    prompt["5"]["inputs"]["settings"] = ["9", 0]
    entry = server.wait(server.queue(prompt))
    (error,) = messages(entry, "execution_error")
    assert (
        error["node_id"] == "5" and "holds at most max_frames=6 latent frames" in error["exception_message"]
    )
    (cached,) = messages(entry, "execution_cached")
    assert not {"2", "3"} & set(cached["nodes"]) and set(error["executed"]) <= {"9"}  # nothing loaded


def test_wrong_model_file_says_what_to_fix(server):
    entry = server.wait(
        server.queue(api("reward_forcing_t2v_5s", **{"3": {"model_name": "not_a_dit.safetensors"}}))
    )
    (error,) = messages(entry, "execution_error")
    assert error["exception_message"].startswith(
        "not_a_dit.safetensors is a Wan 2.1 VAE, not a Wan2.1 text-to-video diffusion model: load it with Load VAE"
    )
