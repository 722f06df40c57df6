"""CPU cost of the two ways to get live frames to the browser, over a real localhost WebSocket.

* ``binary``: what ComfyUI does for ``send_sync(BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA,
  (("JPEG", pil_image, None), metadata))``: the server's event loop JPEG-encodes each frame
  (quality 95), prefixes a 4-byte length + JSON metadata and sends one binary message per frame.
* ``event``: the live node's way (nodes/live/transport.py): a sender thread JPEG-encodes the chunk
  (quality 85) and sends one JSON event holding base64 frames; the loop only serialises and sends.
* ``event-q95``: the same at quality 95, to separate the quality from the transport.

The server side reproduces ComfyUI's PromptServer publish loop (aiohttp, one asyncio queue drained
by a coroutine); a client on another thread receives and parses like the frontend does. Chunks are
submitted at a fixed pace (``--chunk-interval``, 0.3 s ~ 40 FPS of 12-frame chunks).

Needs aiohttp and Pillow (ComfyUI's venv has both). Run from the repository root:
    python benchmarks/live_transport_bench.py --chunks 30
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.live.loop import LiveChunk  # noqa: E402
from nodes.live.transport import chunk_payload, encode_jpegs  # noqa: E402

PREVIEW_IMAGE_WITH_METADATA = 4


def synthetic_frames(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Photo-like frames: smooth colour fields plus fine texture, panning from frame to frame
    (random noise would make JPEG sizes unrealistically large)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((3, h // 32 + 2, w // 32 + 2 + n), generator=g)
    field = torch.nn.functional.interpolate(low[None], scale_factor=32, mode="bicubic", align_corners=False)[
        0
    ]
    fine = torch.rand((3, h // 2, (w + 32 * n) // 2), generator=g)
    texture = 0.06 * torch.nn.functional.interpolate(fine[None], scale_factor=2, mode="bilinear")[0]
    frames = []
    for i in range(n):
        x = field[:, :h, 8 * i : 8 * i + w] + texture[:, :, 8 * i : 8 * i + w]
        frames.append((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0))
    return torch.stack(frames).contiguous()


class Server:
    """A PromptServer-like publisher: send_sync from any thread, sends from the loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop_cpu = 0.0
        self.ready = threading.Event()
        self.ws = None
        self.port = None
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        self.messages: asyncio.Queue = asyncio.Queue()
        app = web.Application()
        self.connected = asyncio.Event()

        async def ws_handler(request):
            ws = web.WebSocketResponse(max_msg_size=0)
            await ws.prepare(request)
            self.ws = ws
            self.connected.set()
            async for _ in ws:
                pass
            return ws

        app.router.add_get("/ws", ws_handler)

        async def start():
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self.loop.create_task(self._publish())
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def send_sync(self, event, data) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (event, data))

    async def _publish(self) -> None:
        from PIL import Image  # noqa: F401  (imported before timing)

        while True:
            event, data = await self.messages.get()
            t0 = time.thread_time()
            if event == PREVIEW_IMAGE_WITH_METADATA:  # ComfyUI: send_image_with_metadata
                (image_type, image, _max), metadata = data
                metadata = {**metadata, "image_type": "image/jpeg"}
                meta = json.dumps(metadata).encode()
                buf = io.BytesIO()
                image.save(buf, format=image_type, quality=95, compress_level=1)
                body = bytearray(struct.pack(">I", len(meta)))
                body.extend(meta)
                body.extend(buf.getvalue())
                message = bytearray(struct.pack(">I", event))  # ComfyUI: encode_bytes
                message.extend(body)
                send = self.ws.send_bytes(message)
            else:  # ComfyUI: send_json
                send = self.ws.send_json({"type": event, "data": data})
            self.loop_cpu += time.thread_time() - t0
            t1 = time.thread_time()
            await send
            self.loop_cpu += time.thread_time() - t1


class Client:
    """Receives and parses messages like the frontend's api.ts; records arrival times."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bytes = 0
        self.frames_received = 0
        self.arrivals: dict[int, float] = {}  # chunk index -> time its last frame arrived
        self.ready = threading.Event()
        threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True).start()
        self.ready.wait(10)

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"http://127.0.0.1:{self.port}/ws", max_msg_size=0) as ws:
                self.ready.set()
                async for msg in ws:
                    now = time.perf_counter()
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        data = msg.data
                        self.bytes += len(data)
                        n = struct.unpack(">I", data[4:8])[0]
                        meta = json.loads(data[8 : 8 + n])
                        self.frames_received += 1
                        if meta["last"]:
                            self.arrivals[meta["chunk"]] = now
                    else:
                        self.bytes += len(msg.data.encode())
                        body = json.loads(msg.data)["data"]
                        self.frames_received += len(body["frames"])
                        self.arrivals[body["index"]] = now


def run_mode(mode: str, chunks: list[torch.Tensor], interval: float) -> dict:
    from PIL import Image

    server = Server()
    client = Client(server.port)
    fut = asyncio.run_coroutine_threadsafe(server.connected.wait(), server.loop)
    fut.result(10)
    worker_cpu = 0.0
    submitted: dict[int, float] = {}
    quality = 95 if mode in ("binary", "event-q95") else 85
    for index, frames in enumerate(chunks):
        start = time.perf_counter()
        submitted[index] = start
        t0 = time.thread_time()
        if mode == "binary":
            for j, frame in enumerate(frames.numpy()):
                image = Image.fromarray(frame)
                meta = {"node_id": "1", "prompt_id": "p", "chunk": index, "last": j == len(frames) - 1}
                server.send_sync(PREVIEW_IMAGE_WITH_METADATA, (("JPEG", image, None), meta))
        else:
            chunk = LiveChunk("0" * 32, index, index * len(frames), frames, 0, 0.0, None)
            server.send_sync(
                "rewardforcing.live.chunk", chunk_payload(chunk, encode_jpegs(frames, quality), 16.0, "1")
            )
        worker_cpu += time.thread_time() - t0
        time.sleep(max(0.0, interval - (time.perf_counter() - start)))
    deadline = time.perf_counter() + 30
    while len(client.arrivals) < len(chunks) and time.perf_counter() < deadline:
        time.sleep(0.01)
    n_frames = sum(len(c) for c in chunks)
    delivery = [1000 * (client.arrivals[i] - submitted[i]) for i in client.arrivals]
    return {
        "jpeg_quality": quality,
        "frames": n_frames,
        "frames_received": client.frames_received,
        "generator_side_ms_per_frame": round(1000 * worker_cpu / n_frames, 3),
        "server_loop_ms_per_frame": round(1000 * server.loop_cpu / n_frames, 3),
        "wire_kib_per_frame": round(client.bytes / n_frames / 1024, 1),
        "chunk_delivery_ms_median": round(statistics.median(delivery), 1),
        "chunk_delivery_ms_max": round(max(delivery), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=30)
    parser.add_argument("--frames", type=int, default=12, help="frames per chunk")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--chunk-interval", type=float, default=0.3, help="seconds between chunks")
    parser.add_argument(
        "--dump", metavar="PATH", help="also write one chunk in both encodings for live_browser_bench.mjs"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    chunks = [synthetic_frames(args.frames, args.height, args.width, seed=i) for i in range(args.chunks)]
    result = {
        "size": f"{args.width}x{args.height}",
        "frames_per_chunk": args.frames,
        "chunk_interval_s": args.chunk_interval,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for mode in ("binary", "event", "event-q95"):
        result[mode] = run_mode(mode, chunks, args.chunk_interval)
    print(json.dumps(result, indent=2))
    if args.dump:
        dump_chunk(chunks[0], args.dump)


def dump_chunk(frames: torch.Tensor, path: str) -> None:
    """One chunk as the page receives it: the JSON event text (quality 85) and the JPEG bodies of the
    binary previews (quality 95, base64 here only to fit in the file)."""
    import base64

    chunk = LiveChunk("0" * 32, 0, 0, frames, 0, 0.0, None)
    event = json.dumps(
        {
            "type": "rewardforcing.live.chunk",
            "data": chunk_payload(chunk, encode_jpegs(frames, 85), 16.0, "1"),
        }
    )
    binary = [base64.b64encode(j).decode() for j in encode_jpegs(frames, 95)]
    Path(path).write_text(json.dumps({"event_text": event, "binary_jpegs": binary}))


if __name__ == "__main__":
    main()
