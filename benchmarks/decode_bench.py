"""Decoder speed at 480x832: streaming Wan 2.1 VAE decode and TAEHV, bf16 on CUDA, random weights.

A stream of 21 latent frames (60x104) is decoded in 7 chunks of 3 (81 frames), the way the
engine feeds the decoders. Each variant gets one untimed warm-up stream, then ``--reps`` timed
streams; every chunk is timed with CUDA events and the median over the repetitions is kept.
Prints one JSON object.

    python benchmarks/decode_bench.py                      # Wan eager + channels-last, TAEHV
    python benchmarks/decode_bench.py --wan-variants eager,channels_last,channels_last+compile
    python benchmarks/decode_bench.py --latents-per-step 1 # one latent per decoder pass
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder  # noqa: E402
from rf_core.vae.taehv import TAEHV  # noqa: E402
from rf_core.vae.wan_vae import WanVAE  # noqa: E402

GIB = 2**30
DEVICE = "cuda"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def time_stream(decoder, chunks: list[torch.Tensor], reps: int) -> dict:
    """Warm up on one stream, then time ``reps`` streams chunk by chunk."""
    decoder.reset()
    frames_per_chunk = [decoder.decode_chunk(c).shape[1] for c in chunks]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    per_chunk = [[] for _ in chunks]
    for _ in range(reps):
        decoder.reset()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(chunks) + 1)]
        events[0].record()
        for i, chunk in enumerate(chunks):
            decoder.decode_chunk(chunk)
            events[i + 1].record()
        torch.cuda.synchronize()
        for i in range(len(chunks)):
            per_chunk[i].append(events[i].elapsed_time(events[i + 1]))
    chunk_ms = [statistics.median(t) for t in per_chunk]
    total_ms = sum(chunk_ms)
    frames = sum(frames_per_chunk)
    steady = chunk_ms[1:] or chunk_ms
    return {
        "frames": frames,
        "frames_per_chunk": frames_per_chunk,
        "chunk_ms": [round(t, 2) for t in chunk_ms],
        "first_chunk_ms": round(chunk_ms[0], 2),
        "steady_chunk_ms_median": round(statistics.median(steady), 2),
        "steady_ms_per_frame": round(statistics.median(steady) / frames_per_chunk[-1], 3),
        "stream_total_ms": round(total_ms, 1),
        "ms_per_frame": round(total_ms / frames, 3),
        "fps": round(1000 * frames / total_ms, 1),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
    }


def bench_wan(variant: str, chunks, args) -> dict:
    torch.cuda.empty_cache()
    with torch.device(DEVICE):
        vae = WanVAE().to(torch.bfloat16).eval().requires_grad_(False)
    del vae.encoder  # decoding only: do not count the encoder's weights
    if "channels_last" in variant:
        vae.use_channels_last()
    if "compile" in variant:
        vae.decoder.compile(mode=args.compile_mode)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    decoder = WanStreamDecoder(vae, latents_per_step=args.latents_per_step or None)
    result = time_stream(decoder, chunks, args.reps)
    decoder.reset()
    for c in chunks[:2]:
        decoder.decode_chunk(c)
    result["cache_gib"] = round(decoder.cache_elements() * vae.dtype.itemsize / GIB, 3)
    result["weights_gib"] = round(weights / GIB, 3)
    del decoder, vae
    return result


def bench_taehv(chunks, latents, args) -> dict:
    torch.cuda.empty_cache()
    with torch.device(DEVICE):
        taehv = TAEHV().to(torch.bfloat16).eval().requires_grad_(False)
    result = {"stream": time_stream(TAEHVStreamDecoder(taehv), chunks, args.reps)}
    with torch.no_grad():
        taehv.decode_video(latents)  # warm-up
        times = []
        for _ in range(args.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = taehv.decode_video(latents)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    result["parallel_whole_video"] = {
        "frames": out.shape[1],
        "ms": round(ms, 2),
        "ms_per_frame": round(ms / out.shape[1], 3),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--chunks", type=int, default=7)
    parser.add_argument("--chunk-latents", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--wan-variants",
        default="eager,channels_last",
        help="comma list of: eager, channels_last, compile, channels_last+compile (empty: skip)",
    )
    parser.add_argument(
        "--compile-mode", default="default", help="torch.compile mode for the compile variants"
    )
    parser.add_argument(
        "--latents-per-step", type=int, default=0, help="Wan latents per decoder pass (0: whole chunk)"
    )
    parser.add_argument("--skip-taehv", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_bench needs a CUDA device")

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    h, w = args.height // 8, args.width // 8
    latents = torch.randn(1, args.chunks * args.chunk_latents, 16, h, w, device=DEVICE, dtype=torch.bfloat16)
    chunks = list(latents.split(args.chunk_latents, dim=1))

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "video": f"{args.width}x{args.height}",
        "latent_frames": latents.shape[1],
        "chunk_latents": args.chunk_latents,
        "dtype": "bfloat16",
        "reps": args.reps,
        "latents_per_step": args.latents_per_step or "chunk",
        "wan": {},
    }
    for variant in filter(None, args.wan_variants.split(",")):
        report["wan"][variant] = bench_wan(variant, chunks, args)
    if not args.skip_taehv:
        report["taehv"] = bench_taehv(chunks, latents, args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
