"""Decoder speed at 480x832: streaming Wan 2.1 VAE decode and TAEHV, bf16 on CUDA, random weights.

A stream of 21 latent frames (60x104) is decoded in 7 chunks of 3 (81 frames), the way the
engine feeds the decoders. Each variant gets one untimed warm-up stream (which compiles), then
``--reps`` timed streams; every chunk is timed with CUDA events and the median over the
repetitions is kept. Memory is measured per variant: the previous variant is freed first,
``peak_allocated_gib`` is the timed streams' peak and ``peak_with_warmup_gib`` includes the
warm-up (compilation, autotuning). ``cache_gib`` is the causal state's size and
``cache_storage_gib`` the storage it keeps alive (larger if histories are views of bigger buffers).
Prints one JSON object.

    python benchmarks/decode_bench.py                      # Wan eager + channels-last, TAEHV
    python benchmarks/decode_bench.py --wan-variants eager,channels_last,channels_last+compile
    python benchmarks/decode_bench.py --wan-variants channels_last+compile,fast --latents-per-step 1
    python benchmarks/decode_bench.py --wan-variants fast --latents-per-step 1 --frames-per-pass 1
    python benchmarks/decode_bench.py --tiny               # quick smoke run, CPU or GPU

Wan variants: eager, channels_last, compile, channels_last+compile (``decoder.compile()`` on the
whole forward), fast (``WanVAE.make_fast()``: channels-last, compiled pure-tensor pieces),
fast_eager (``make_fast(compile=False)``: the same pieces uncompiled).
"""

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder  # noqa: E402
from rf_core.vae.taehv import TAEHV, TAEHVConfig  # noqa: E402
from rf_core.vae.wan_vae import WanVAE, WanVAEConfig  # noqa: E402

GIB = 2**30
WAN_VARIANTS = ("eager", "channels_last", "compile", "channels_last+compile", "fast", "fast_eager")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except OSError:
        return None


class Clock:
    """Per-chunk timing: CUDA events on the GPU, wall time (after the work is done) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1000 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def time_stream(decoder, chunks: list[torch.Tensor], reps: int) -> dict:
    """Warm up on one stream, then time ``reps`` streams chunk by chunk."""
    device = chunks[0].device
    decoder.reset()
    frames_per_chunk = [decoder.decode_chunk(c).shape[1] for c in chunks]
    warmup_peak = peak_gib(device)
    reset_peak(device)
    per_chunk = [[] for _ in chunks]
    for _ in range(reps):
        decoder.reset()
        clock = Clock(device)
        clock.mark()
        for chunk in chunks:
            decoder.decode_chunk(chunk)
            clock.mark()
        for i, ms in enumerate(clock.intervals_ms()):
            per_chunk[i].append(ms)
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
        "peak_allocated_gib": peak_gib(device),
        "peak_with_warmup_gib": warmup_peak,
    }


def free_memory(device: torch.device) -> None:
    """Drop what the previous variant left: compiled graphs (which may hold its tensors) and cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_wan(variant: str, chunks, args) -> dict:
    device = chunks[0].device
    free_memory(device)
    before = torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    reset_peak(device)
    config = WanVAEConfig(dim=8) if args.tiny else WanVAEConfig()
    with device:
        vae = WanVAE(config).to(torch.bfloat16).eval().requires_grad_(False)
    del vae.encoder  # decoding only: do not count the encoder's weights
    compile_kwargs = {"mode": args.compile_mode} if args.compile_mode != "default" else {}
    if variant in ("fast", "fast_eager"):
        vae.make_fast(
            compile=variant == "fast", frames_per_pass=args.frames_per_pass or None, **compile_kwargs
        )
    else:
        if "channels_last" in variant:
            vae.use_channels_last()
        if "compile" in variant:
            vae.decoder.compile(**compile_kwargs)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    decoder = WanStreamDecoder(vae, latents_per_step=args.latents_per_step or None)
    result = time_stream(decoder, chunks, args.reps)
    decoder.reset()
    for c in chunks[:2]:
        decoder.decode_chunk(c)
    result["cache_gib"] = round(decoder.cache_elements() * vae.dtype.itemsize / GIB, 3)
    result["cache_storage_gib"] = round(decoder.cache_storage_bytes() / GIB, 3)
    result["weights_gib"] = round(weights / GIB, 3)
    result["allocated_before_gib"] = None if before is None else round(before, 3)
    result["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    del decoder, vae
    return result


def bench_taehv(chunks, latents, args) -> dict:
    device = latents.device
    free_memory(device)
    config = TAEHVConfig(widths=(8, 8, 8, 8)) if args.tiny else TAEHVConfig()
    with device:
        taehv = TAEHV(config).to(torch.bfloat16).eval().requires_grad_(False)
    result = {"stream": time_stream(TAEHVStreamDecoder(taehv), chunks, args.reps)}
    with torch.no_grad():
        taehv.decode_video(latents)  # warm-up
        times = []
        for _ in range(args.reps):
            clock = Clock(device)
            clock.mark()
            out = taehv.decode_video(latents)
            clock.mark()
            times.extend(clock.intervals_ms())
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
        help=f"comma list of: {', '.join(WAN_VARIANTS)} (empty: skip)",
    )
    parser.add_argument(
        "--compile-mode", default="default", help="torch.compile mode for the compile and fast variants"
    )
    parser.add_argument(
        "--latents-per-step", type=int, default=0, help="Wan latents per decoder pass (0: whole chunk)"
    )
    parser.add_argument(
        "--frames-per-pass",
        type=int,
        default=0,
        help="fast variants: frames per pass through the two largest resolutions (0: all at once)",
    )
    parser.add_argument("--skip-taehv", action="store_true")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run: dim-8 Wan VAE, tiny TAEHV, 32x48 video, 2 chunks, 1 rep; runs on the CPU too"
        " (about a minute per compiled variant there)",
    )
    parser.add_argument(
        "--memory-snapshot",
        type=Path,
        help="folder for one CUDA memory snapshot per Wan variant (view at https://pytorch.org/memory_viz)",
    )
    args = parser.parse_args()
    variants = [v for v in args.wan_variants.split(",") if v]
    unknown = sorted(set(variants) - set(WAN_VARIANTS))
    if unknown:
        raise SystemExit(f"unknown --wan-variants {unknown}; choose from {', '.join(WAN_VARIANTS)}")
    if args.tiny:
        args.height, args.width, args.chunks, args.reps = 32, 48, 2, 1
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("decode_bench needs a CUDA device (or --tiny for a CPU smoke run)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    h, w = args.height // 8, args.width // 8
    latents = torch.randn(1, args.chunks * args.chunk_latents, 16, h, w, device=device, dtype=torch.bfloat16)
    chunks = list(latents.split(args.chunk_latents, dim=1))

    cuda = device.type == "cuda"
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "video": f"{args.width}x{args.height}",
        "tiny": args.tiny,
        "latent_frames": latents.shape[1],
        "chunk_latents": args.chunk_latents,
        "dtype": "bfloat16",
        "reps": args.reps,
        "latents_per_step": args.latents_per_step or "chunk",
        "compile_mode": args.compile_mode,
        "frames_per_pass": args.frames_per_pass or "all",
        "wan": {},
    }
    for variant in variants:
        if args.memory_snapshot and cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        report["wan"][variant] = bench_wan(variant, chunks, args)
        if args.memory_snapshot and cuda:
            args.memory_snapshot.mkdir(parents=True, exist_ok=True)
            path = args.memory_snapshot / f"wan_{variant.replace('+', '_')}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            report["wan"][variant]["memory_snapshot"] = str(path)
    if not args.skip_taehv:
        report["taehv"] = bench_taehv(chunks, latents, args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
