"""Live mode at full size, headless: the Live node's loop (nodes/live/loop.py) with random weights.

For each decoder (TAEHV, Wan 2.1 VAE) one stream runs through ``LiveLoop`` exactly as the node drives
it: decode of every chunk, frames to uint8 on the host, the page sender thread (JPEG + base64; the
send itself is a no-op here), and the MP4 recording (libx264 into a temp file). Prompt switches are
requested from another thread at random moments while chunks are being generated, like Enter in the
browser. Reports, as one JSON object:

* sustained FPS: video frames per second after ``--warmup`` chunks (generation as fast as possible,
  i.e. the node's ``realtime`` off; with it on, generation is paced to 16 fps playback);
* prompt-switch latency: from the request to the moment the first chunk generated under the new
  prompt is decoded (what the loop reports; the page then adds transport and its jitter buffer).
  Text encoding is excluded (random embeddings): umT5-XXL encode time adds to it in the node.

    python benchmarks/live_bench.py                       # 1.3B, bf16, 480x832, CUDA
    python benchmarks/live_bench.py --variant fast --switches 8 --chunks 60
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.live.loop import LiveLoop  # noqa: E402
from nodes.live.transport import ChunkSender  # noqa: E402
from rf_core.config import StreamConfig, get_preset  # noqa: E402
from rf_core.io.video import Mp4Writer  # noqa: E402
from rf_core.stream import StreamSession  # noqa: E402
from rf_core.tiny import random_model, random_prompt  # noqa: E402

FPS = 16.0


def make_decoder(kind: str, device: torch.device, dtype: torch.dtype, fast: bool = False):
    from rf_core.tiny import randomize_
    from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder
    from rf_core.vae.taehv import TAEHV
    from rf_core.vae.wan_vae import WanVAE

    if kind == "taehv":
        return TAEHVStreamDecoder(randomize_(TAEHV()).to(device, dtype).eval())
    if kind == "wan":
        vae = WanVAE().to(device, dtype).eval().requires_grad_(False)
        if fast:  # as Load Decoder's default speed
            vae.make_fast()
        return WanStreamDecoder(vae, latents_per_step=1)
    raise SystemExit(f"unknown decoder {kind!r}: taehv or wan")


def git_commit() -> str | None:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return out.stdout.strip() or None


def run_stream(model, cfg, decoder, args, device, dtype) -> dict:
    prompts = [random_prompt(cfg, tokens=40, seed=s).to(device, dtype) for s in range(4)]
    session = StreamSession(model, prompts[0], (args.height // 8, args.width // 8), StreamConfig(), seed=0)
    done: list[tuple[float, int]] = []  # (time the chunk's frames were ready, frames)
    latencies: list[float] = []
    state = {"switches": 0, "pending": False}
    rng = random.Random(0)
    sender = ChunkSender(lambda event, payload: None, FPS) if args.sender else None
    tmp = tempfile.TemporaryDirectory()
    writer = Mp4Writer(Path(tmp.name) / "live.mp4", fps=FPS) if args.record else None

    def request_later(delay: float) -> None:
        def fire():
            try:
                loop.request_prompt(f"prompt {state['switches'] % 3 + 1}", recache=args.recache)
            except RuntimeError:  # the stream ended first
                pass

        threading.Timer(delay, fire).start()

    def on_chunk(chunk) -> None:
        done.append((time.perf_counter(), chunk.frames.shape[0]))
        if sender is not None:
            sender.submit(chunk)
        if chunk.switch_latency is not None:
            latencies.append(chunk.switch_latency)
            state["pending"] = False
        if chunk.index + 1 >= args.warmup and not state["pending"] and state["switches"] < args.switches:
            # a request at a random moment of the next chunk's generation
            state["pending"] = True
            state["switches"] += 1
            request_later(rng.uniform(0.0, chunk.seconds))

    loop = LiveLoop(
        "0" * 32,
        session,
        decoder,
        lambda text: prompts[int(text.split()[-1])],
        on_chunk,
        writer=writer,
        max_chunks=args.chunks,
        recache=args.recache,
        fps=FPS,
        realtime=args.realtime,
    )
    result = loop.run()
    if sender is not None:
        sender.close()
    tmp.cleanup()
    steady = done[args.warmup - 1 :]
    frames = sum(n for _, n in steady[1:])
    seconds = steady[-1][0] - steady[0][0]
    gaps = sorted(b[0] - a[0] for a, b in zip(steady, steady[1:]))
    return {
        "chunks": result.chunks,
        "video_frames": result.frames,
        "fps_sustained": round(frames / seconds, 2),
        "chunk_ms_p50": round(1000 * statistics.median(gaps), 1),
        "chunk_ms_max": round(1000 * gaps[-1], 1),
        "switch_latency_ms": {
            "n": len(latencies),
            "median": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "max": round(1000 * max(latencies), 1) if latencies else None,
            "all": [round(1000 * x, 1) for x in latencies],
        },
        "sender_dropped_chunks": sender.dropped if sender is not None else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoders", default="taehv,wan")
    p.add_argument(
        "--variant", default="plain", choices=["plain", "fast"], help="fast: rf_core.speed.make_fast"
    )
    p.add_argument("--chunks", type=int, default=40, help="chunks per stream (12 frames each)")
    p.add_argument("--warmup", type=int, default=4, help="chunks left out of the FPS figure")
    p.add_argument("--switches", type=int, default=6, help="prompt switches per stream")
    p.add_argument("--recache", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--realtime", action="store_true", help="pace generation to playback, as the node's default"
    )
    p.add_argument("--sender", action=argparse.BooleanOptionalAction, default=True, help="JPEG sender thread")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True, help="write the MP4")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    args = p.parse_args()
    if args.warmup < 1 or args.chunks <= args.warmup + 1:
        raise SystemExit("need --warmup >= 1 and --chunks > warmup + 1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cudnn.benchmark = True
    cfg = get_preset(args.preset)
    model = random_model(cfg, seed=0, device=device, dtype=dtype)
    if args.variant == "fast":
        from rf_core.speed import make_fast

        make_fast(model, attn_backend="auto", cuda_graphs=cuda)  # as Load Model's default speed
    out = {
        "bench": "live",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "preset": args.preset,
        "size": f"{args.width}x{args.height}",
        "dtype": str(dtype).removeprefix("torch."),
        "variant": args.variant,
        "recache": args.recache,
        "realtime": args.realtime,
        "sender": args.sender,
        "record": args.record,
        "warmup_chunks": args.warmup,
    }
    for kind in args.decoders.split(","):
        decoder = make_decoder(kind, device, dtype, fast=args.variant == "fast")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out[kind] = run_stream(model, cfg, decoder, args, device, dtype)
        if cuda:
            out[kind]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps({kind: out[kind]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
