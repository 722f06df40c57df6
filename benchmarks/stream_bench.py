"""Streaming benchmark at full size with random weights (reference-algorithm.md shapes).

Runs the 1.3B student in bf16 at 480x832 for each variant and frame count, and prints one JSON row per
(variant, frames): end-to-end FPS (text encoding excluded: embeddings are random), DiT-only time,
decode time, time to first frame, per-chunk latency p50/p99, MFU, peak GPU memory. Median of
--repeats runs after one warm-up run.

    python benchmarks/stream_bench.py --variants plain,cudnn,fast --frames 21 --frames 120 --out bench.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_core.config import StreamConfig, get_preset  # noqa: E402
from rf_core.speed import make_fast  # noqa: E402
from rf_core.stream import StreamSession  # noqa: E402
from rf_core.tiny import random_model, random_prompt  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def chunk_flops(cfg, frame_tokens: int, chunk_frames: int, key_frames: int, passes: int = 5) -> float:
    n = frame_tokens * chunk_frames
    lk = frame_tokens * key_frames
    d = cfg.dim
    linear = 2 * n * (6 * d * d + 2 * d * cfg.ffn_dim)
    attn = 4 * n * lk * d + 4 * n * cfg.text_len * d
    return passes * cfg.num_layers * (linear + attn)


def make_decoder(kind: str, device, dtype, compile_decoder: bool):
    from rf_core.pipeline import AsyncDecoder

    if kind == "none":
        return None
    kind, _, fpp = kind.partition("@")  # wan-fast@N: N frames per pass at the two top resolutions
    frames_per_pass = int(fpp) if fpp else None
    if fpp and kind != "wan-fast":
        raise ValueError(f"decoder {kind!r} takes no @N (frames per pass): only wan-fast does")
    if kind in ("wan", "wan-fast"):
        from rf_core.vae.stream_decode import WanStreamDecoder
        from rf_core.vae.wan_vae import WanVAE

        vae = WanVAE().to(device, dtype).eval().requires_grad_(False)
        if kind == "wan-fast":  # compiled pure-tensor pieces, sub-pixel upsampling
            vae.make_fast(frames_per_pass=frames_per_pass)
        elif compile_decoder:
            vae.use_channels_last()
            vae.decoder.compile()
        # one latent per decoder pass: same frames, a third of the compiled decoder's peak memory
        return AsyncDecoder(WanStreamDecoder(vae, latents_per_step=1), device)
    if kind == "taehv":
        from rf_core.vae.stream_decode import TAEHVStreamDecoder
        from rf_core.vae.taehv import TAEHV

        return AsyncDecoder(
            TAEHVStreamDecoder(TAEHV().to(device, dtype).eval().requires_grad_(False)), device
        )
    raise ValueError(kind)


def run_once(session, frames, decoder, sync, overlap):
    """One stream on a reset session (its buffers, and CUDA graphs if on, are reused as a streaming
    app would). With a decoder, frames are decoded through AsyncDecoder (on a side stream when
    ``overlap``, else waited for right away); times are taken when each chunk's frames are on the host."""
    chunks = frames // session.config.chunk_frames
    times, dit_times = [], []
    video_frames = 0
    ttff = None
    t0 = time.perf_counter()
    session.reset(0)
    if decoder is not None:
        decoder.reset()
    last = t0

    def got(n):
        nonlocal video_frames, ttff, last
        now = time.perf_counter()
        video_frames += n
        if ttff is None:
            ttff = now - t0
        times.append(now - last)
        last = now

    for c in range(chunks):
        c0 = time.perf_counter()
        z = session.next_chunk()
        if decoder is None:
            z.cpu()
            dit_times.append(time.perf_counter() - c0)
            got(9 if c == 0 else 12)
            continue
        if not overlap:
            sync()
            dit_times.append(time.perf_counter() - c0)
        decoder.submit(z)
        if not overlap or c == 0:  # the first chunk's frames right away: time to first frame
            got(decoder.result().shape[1])
        elif len(decoder.pending) > 1:
            got(decoder.result().shape[1])
    if decoder is not None:
        for f in decoder.drain():
            got(f.shape[1])
    total = time.perf_counter() - t0
    return dict(total=total, ttff=ttff, chunk=times, dit=dit_times, video_frames=video_frames)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="plain,cudnn,fast")
    p.add_argument("--frames", type=int, action="append")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--decoder",
        default="none",
        help="comma list of none, wan, wan-fast, wan-fast@N (N frames per pass at the top resolutions), taehv",
    )
    p.add_argument("--overlap", action="store_true", help="decode on a side stream while the DiT runs")
    p.add_argument(
        "--compile-decoder", action="store_true", help="channels_last + torch.compile the Wan decoder"
    )
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--out", default=None)
    p.add_argument("--check", action="store_true", help="compare each variant's first chunk with plain")
    p.add_argument(
        "--profile", action="store_true", help="print the top GPU kernels of two steady-state chunks"
    )
    p.add_argument(
        "--memory-peak", action="store_true", help="one more run, printing what is allocated at its peak"
    )
    p.add_argument(
        "--trace", default=None, help="with --profile: write the chrome trace there and print GPU idle gaps"
    )
    args = p.parse_args()
    frames_list = args.frames or [21]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = get_preset(args.preset)
    latent_hw = (args.height // 8, args.width // 8)
    frame_tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    model = random_model(cfg, seed=0, device=device, dtype=dtype)
    prompt = random_prompt(cfg, tokens=40, seed=0).to(device, dtype)
    config = StreamConfig()
    decoders = {k: make_decoder(k, device, dtype, args.compile_decoder) for k in args.decoder.split(",")}
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    reference_chunk = None
    rows = []
    for variant in args.variants.split(","):
        if variant == "plain":
            model.attn_backend = "sdpa"
        elif variant == "cudnn":
            model.attn_backend = "auto"
        elif variant == "fast":
            make_fast(model, attn_backend="auto")
        elif variant == "fast-old":  # the fast path as of run 9: un-roped keys, GELU kernel
            make_fast(model, attn_backend="auto", roped_keys=False, gelu_epilogue=False)
        elif variant == "fast-nogelu":
            make_fast(model, attn_backend="auto", gelu_epilogue=False)
        elif variant == "fast-graphs":
            make_fast(model, attn_backend="auto", cuda_graphs=True)
        elif variant == "fast-graphs-tuned":  # Inductor's coordinate-descent tuning of its Triton kernels
            if model.compiled:
                raise SystemExit("fast-graphs-tuned compiles the blocks itself: run it in its own process")
            model.compile_blocks(options={"coordinate_descent_tuning": True})
            make_fast(model, attn_backend="auto", cuda_graphs=True)
        elif variant == "fast-fp8":
            make_fast(model, attn_backend="auto", fp8=True)
        elif variant == "fast-max-autotune":
            make_fast(model, attn_backend="auto", compile_mode="max-autotune-no-cudagraphs")
        else:
            raise SystemExit(f"unknown variant {variant}")
        if args.check:  # 7 chunks: with CUDA graphs, chunk 3 captures and chunks 4-6 replay
            s = StreamSession(model, prompt, latent_hw, config, seed=0)
            z = torch.cat([s.next_chunk().float() for _ in range(7)], 1)
            del s
            if reference_chunk is None:
                reference_chunk = z
            rel = [  # vs the previous variant (fast then fast-graphs: the graphs must change nothing)
                (
                    (z[:, i : i + 3] - reference_chunk[:, i : i + 3]).norm()
                    / reference_chunk[:, i : i + 3].norm()
                ).item()
                for i in range(0, 21, 3)
            ]
            print(json.dumps(dict(variant=variant, per_chunk_rel_diff_vs_previous_variant=rel)), flush=True)
            reference_chunk = z
        session = None
        for (dname, decoder), frames in [(d, f) for d in decoders.items() for f in frames_list]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t_warm = time.perf_counter()
            session = session or StreamSession(model, prompt, latent_hw, config, seed=0)
            run_once(session, frames, decoder, sync, args.overlap)
            warm_s = time.perf_counter() - t_warm
            runs = [run_once(session, frames, decoder, sync, args.overlap) for _ in range(args.repeats)]
            if args.memory_peak and cuda:
                print_memory_peak(functools.partial(run_once, session, frames, decoder, sync, args.overlap))
            best = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
            chunks = frames // config.chunk_frames
            flops = sum(  # the last chunk's cache refresh never runs (StreamSession defers it)
                chunk_flops(
                    cfg, frame_tokens, 3, min(3 * (c + 1), config.window_frames), 5 - (c == chunks - 1)
                )
                for c in range(chunks)
            )
            dit_total = sum(best["dit"]) or float("nan")
            lat = sorted(x for r in runs for x in r["chunk"][3:]) or sorted(best["chunk"])
            row = dict(
                variant=variant,
                decoder=dname
                + ("+compile" if args.compile_decoder and dname == "wan" else "")
                + ("+overlap" if args.overlap else ""),
                latent_frames=frames,
                video_frames=best["video_frames"],
                seconds=best["total"],
                fps=best["video_frames"] / best["total"],
                dit_seconds=dit_total,
                dit_fps=best["video_frames"] / dit_total,
                decode_seconds=best["total"] - dit_total,
                ttff_s=best["ttff"],
                chunk_p50_ms=1000 * statistics.median(lat),
                chunk_p99_ms=1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                dit_tflops=flops / dit_total / 1e12,
                mfu=(flops / dit_total / 1e12 / peak) if peak else None,
                warmup_s=warm_s,
                all_seconds=[r["total"] for r in runs],
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                resident_gib=torch.cuda.memory_allocated() / 2**30 if cuda else None,
                gpu=gpu,
                torch=torch.__version__,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.profile:
            profile_chunk(model, prompt, latent_hw, config, args.trace and f"{args.trace}/{variant}.json")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def profile_chunk(model, prompt, latent_hw, config, trace: str | None) -> None:
    """Two steady-state chunks as the DiT-only benchmark runs them (each chunk's latents copied to
    the host). With ``trace``: the chrome trace, and the GPU's idle gaps with the CPU ops under them."""
    from torch.profiler import ProfilerActivity, profile

    s = StreamSession(model, prompt, latent_hw, config, seed=0)
    for _ in range(4):
        s.next_chunk().cpu()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            s.next_chunk().cpu()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70),
        flush=True,
    )
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace)
        print_gaps(prof)


def print_memory_peak(run, top: int = 12) -> None:
    """Replays the allocator's history of one run and prints the live allocations at its peak,
    grouped by the innermost frame in this repository (the baseline: what was live before it).
    Frees of blocks allocated before the run are not seen, so state the run frees and rebuilds
    (a decoder's causal cache on reset) counts twice: subtract it from the transient peak."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    run()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    groups: dict[str, int] = {}
    for ev in at_peak.values():
        frames = [
            f for f in ev.get("frames", []) if "/rf_core/" in f["filename"] or "/benchmarks/" in f["filename"]
        ]
        where = (
            f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']} {frames[0]['name']}"
            if frames
            else "?"
        )
        groups[where] = groups.get(where, 0) + ev["size"]
    print(json.dumps(dict(baseline_gib=base / 2**30, transient_peak_gib=peak / 2**30)), flush=True)
    for where, size in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {size / 2**20:9.1f} MiB  {where}", flush=True)


def print_gaps(prof, top: int = 15) -> None:
    """GPU busy time against the profiled span, and the largest idle gaps between kernels."""
    from torch.autograd import DeviceType

    events = prof.events()
    gpu = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    busy, gaps, end = 0.0, [], gpu[0][0]
    for a, b in gpu:
        if a > end:
            gaps.append((a - end, end, a))
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    span = end - gpu[0][0]
    print(
        json.dumps(
            dict(
                gpu_span_ms=span / 1e3,
                gpu_busy_ms=busy / 1e3,
                idle_ms=(span - busy) / 1e3,
                gaps_over_50us=sum(1 for g in gaps if g[0] > 50),
                idle_in_gaps_over_50us_ms=sum(g[0] for g in gaps if g[0] > 50) / 1e3,
            )
        ),
        flush=True,
    )
    for length, a, _ in sorted(gaps, reverse=True)[:top]:
        under = sorted(
            (e for e in cpu if e.time_range.start <= a <= e.time_range.end),
            key=lambda e: e.time_range.end - e.time_range.start,
        )
        names = [e.name for e in under[:4]]
        print(f"gap {length / 1e3:7.3f} ms at +{(a - gpu[0][0]) / 1e3:8.2f} ms  cpu: {names}", flush=True)


if __name__ == "__main__":
    main()
