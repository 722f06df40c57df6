"""Live mode end to end: real ComfyUI (headless, CPU) with the pack, the real page in headless Chromium.

Opt-in (marker ``e2e``); needs:
  RF_COMFYUI_DIR      a ComfyUI checkout (its main.py is started)
  RF_COMFYUI_PYTHON   a Python with ComfyUI's requirements (default: this interpreter)
  RF_PLAYWRIGHT_DIR   a folder where ``npm install playwright-core`` was run (unless it resolves from here)
  RF_CHROMIUM         Chromium (default /usr/bin/chromium; Debian's ``chromium`` package)
  RF_E2E_SCREENSHOT   where to keep the screenshot (default: the test's temp folder)
See docs/live.md for the commands. The browser part is test_live_browser.mjs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NEW_PROMPT = "a lighthouse on a cliff in a storm at night"

pytestmark = pytest.mark.e2e


def _need_env() -> Path:
    comfy = os.environ.get("RF_COMFYUI_DIR")
    if not comfy:
        pytest.skip("set RF_COMFYUI_DIR to a ComfyUI checkout to run the live browser test")
    comfy_dir = Path(comfy)
    assert (comfy_dir / "main.py").is_file(), f"RF_COMFYUI_DIR={comfy} has no main.py"
    chromium = os.environ.get("RF_CHROMIUM", "/usr/bin/chromium")
    assert Path(chromium).exists(), (
        f"Chromium not found at {chromium}: apt-get install -y chromium, or set RF_CHROMIUM"
    )
    assert shutil.which("node"), "node is not on PATH (needed for Playwright)"
    return comfy_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _write_models(models: Path) -> None:
    """Tiny synthetic files in the real formats, under the names the example workflow uses."""
    from rf_core.tiny import random_model, randomize_
    from rf_core.vae.taehv import TAEHV, TAEHVConfig

    (models / "diffusion_models").mkdir(parents=True)
    (models / "vae_approx").mkdir(parents=True)
    dit = random_model(
        "tiny", seed=0
    )  # Reward Forcing's released layout: "model."-prefixed generator weights
    torch.save(
        {f"model.{k}": v for k, v in dit.state_dict().items()},
        models / "diffusion_models" / "rewardforcing.pt",
    )
    taehv = randomize_(TAEHV(TAEHVConfig(widths=(8, 8, 8, 8))), seed=1)
    torch.save(taehv.state_dict(), models / "vae_approx" / "taew2_1.pth")


def _e2e_workflow() -> dict:
    """The shipped live workflow with the test CLIP instead of the 11 GB umT5, at a CPU-friendly size."""
    wf = json.loads((ROOT / "workflows" / "live_stream.json").read_text())
    for node in wf["nodes"]:
        if node["type"] == "CLIPLoader":
            node["type"] = "RFE2ETinyCLIP"
            node["properties"] = {"Node name for S&R": "RFE2ETinyCLIP"}
            node["widgets_values"] = []
            node["title"] = "Tiny test CLIP"
        if node["type"] == "RewardForcingLive":
            # prompt, seed, control, width, height, steps, max_seconds, recache, realtime, prefix, image_frames
            values = node["widgets_values"]
            values[3:7] = [64, 64, 2, 3600.0]
            values[9] = "live_e2e/live"
    return wf


@pytest.fixture
def comfyui(tmp_path):
    comfy_dir = _need_env()
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-reward-forcing").symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / "rf_e2e_live").symlink_to(
        HERE / "test_live_browser_pack", target_is_directory=True
    )
    _write_models(base / "models")
    # A user who has seen the first-run template browser: the page then opens with ComfyUI's default
    # graph, which tells the browser test the app has finished starting.
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    output = tmp_path / "output"
    port = _free_port()
    log = open(tmp_path / "comfyui.log", "w")
    python = os.environ.get("RF_COMFYUI_PYTHON", sys.executable)
    cmd = [
        python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base), "--output-directory", str(output),
        "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (
                f"ComfyUI exited early:\n{(tmp_path / 'comfyui.log').read_text()[-4000:]}"
            )
            try:
                _get(f"{url}/system_stats", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "ComfyUI did not answer within 180 s"
                time.sleep(0.5)
        yield url, output, tmp_path / "comfyui.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_live_mode_in_the_browser(comfyui, tmp_path):
    from rf_core.io.video import read_video_frames

    url, output, log = comfyui
    logtext = log.read_text()
    assert "IMPORT FAILED" not in logtext.split("Import times for custom nodes:")[-1].split("\n\n")[0], (
        logtext[-3000:]
    )
    assert "RewardForcingLive" in _get(f"{url}/object_info/RewardForcingLive")
    assert any(e.endswith("/live.js") for e in _get(f"{url}/extensions"))

    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(_e2e_workflow()))
    screenshot = Path(os.environ.get("RF_E2E_SCREENSHOT", tmp_path / "live_e2e.png"))
    result_path = tmp_path / "result.json"
    node = subprocess.run(
        [
            "node",
            str(HERE / "test_live_browser.mjs"),
            url,
            str(ROOT / "workflows" / "live_stream.json"),
            str(workflow),
            str(screenshot),
            str(result_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result_path.is_file(), f"browser driver failed:\n{node.stdout}\n{node.stderr}"
    result = json.loads(result_path.read_text())
    assert "error" not in result, f"{result['error']}\n--- server log ---\n{log.read_text()[-4000:]}"

    # the shipped UI workflow is what its API twin says, as the page itself converts it
    twin = json.loads((ROOT / "tests" / "workflows_api" / "live_stream.json").read_text())
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["shippedApi"].items()}
    assert got == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in twin.items()}

    steps = {s["name"]: s for s in result["steps"]}
    assert "Queue the workflow" in result["idleText"]  # a player with no stream says what to do
    assert steps["frames shown"]["framesShown"] >= 5
    assert steps["new prompt shown"]["switchLatencyMs"] > 0
    running = result["statusWhileRunning"]
    assert running["status"] == 200 and running["body"]["prompt"] == NEW_PROMPT
    assert running["body"]["prompt_version"] == 1
    assert (
        result["badRequest"]["status"] == 400 and "32-character id" in result["badRequest"]["body"]["error"]
    )

    assert result["pausedStatus"] == "paused" and "paused and resumed" in steps

    final = result["final"]
    assert final["state"] == "finished" and int(final["chunks"]) >= 2
    assert result["recordingFetch"]["status"] == 200 and result["recordingFetch"]["bytes"] > 0
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    ours = [e for e in result["consoleErrors"] if "/live" in e and "/reward_forcing/live/" not in e]
    ours += [e for e in result["consoleErrors"] if "Unknown message type" in e]
    assert not ours, ours

    status = _get(f"{url}/reward_forcing/live/status?session={result['session']}")
    assert status["state"] == "finished" and status["prompt"] == NEW_PROMPT
    videos = list((output / "live_e2e").glob("live_*.mp4"))
    assert len(videos) == 1 and not list(output.rglob("*.partial.mp4"))
    assert read_video_frames(videos[0]).shape == (status["frames"], 64, 64, 3)
    history = _get(f"{url}/history")
    (entry,) = history.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
