"""Start a real ComfyUI headless on the CPU with the pack linked into custom_nodes, and talk to it over HTTP."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "reward_forcing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``base`` is an isolated ComfyUI base directory (models, custom_nodes, output, temp, user)."""

    def __init__(self, comfy_dir: Path, python: str, base: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.comfy_dir = comfy_dir
        self.python = python
        self.base = base
        self.extra_args = extra_args
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def output(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 240) -> None:
        nodes = self.base / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_FOLDER, REPO), ("rf_e2e_probe", Path(__file__).parent / "probe_pack")):
            link = nodes / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--output-directory", str(self.output),
            "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--preview-method", "none",
            *self.extra_args,
        ]  # fmt: skip
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 (ComfyUI writes to it until stop())
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read()
                return r.status, (json.loads(text) if text else {})
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise AssertionError(f"/prompt answered {status}: {json.dumps(body)[:3000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # ComfyUI writes the history entry once the prompt has finished or failed
                return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue, wait, and insist on success (the error and the log tail are shown otherwise)."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise AssertionError(f"prompt failed: {json.dumps(entry['status'])[:4000]}\n{self.log()[-3000:]}")
        return entry

    def running(self) -> bool:
        return bool(self.get("/queue")["queue_running"])


class WebSocket:
    """The few lines of RFC 6455 a test needs to read ComfyUI's /ws stream (server frames are unmasked)."""

    def __init__(self, server: ComfyServer, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=600)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket upgrade refused: {head[:200]!r}")

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = self.sock.recv(n - len(data))
            if not part:
                raise ConnectionError("websocket closed")
            data += part
        return data

    def receive(self) -> tuple[str, object]:
        """("json", message dict) or ("binary", (event type, payload))."""
        first, second = self._exact(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack(">H", self._exact(2))[0]
        elif size == 127:
            size = struct.unpack(">Q", self._exact(8))[0]
        payload = self._exact(size)
        if first & 0x0F == 2:
            return "binary", (struct.unpack(">I", payload[:4])[0], payload[4:])
        return "json", json.loads(payload)

    def close(self) -> None:
        self.sock.close()


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == kind]
