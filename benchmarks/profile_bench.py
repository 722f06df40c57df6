"""Profiles x decoders at full size with random weights (issue 14): speed, memory under a hard cap, and
the difference from quality with the same weights, prompt and noise.

Each configuration runs in its own process (clean peak memory, and a cap set before anything is
allocated: ``torch.cuda.set_per_process_memory_fraction``, so an overrun is an out-of-memory error,
reported as such). Per configuration one JSON row: end-to-end FPS at each --frames (stream_bench's
run_once: decoded on a side stream, frames on the host), peak GPU memory of the process and of each
run, and against quality (its process saves its latents and frames in --work-dir, so quality runs
first for each decoder): the relative L2 error of the latents over 7 chunks and the PSNR of the decoded
frames. Then a summary table. Models are built on the host in bf16 (the same weights in every
process; low-vram keeps them there) and moved by ``rf_core.profiles.apply_profile``.

Profiles: quality, low-vram, low-vram-kv8 (with the float8 KV cache), low-vram-resident (low-vram with
every block on the GPU: no offload, so its latents must equal low-vram's bit for bit, and the FPS
difference is offload's cost), turbo (needs sageattention and torchao). Caps: --cap-gib for the
low-vram profiles per decoder (default: the issue's targets), none for the others; --small-cap-gib
(3 GiB) repeats the low-vram profiles under that cap.

    python benchmarks/profile_bench.py --profiles quality,low-vram --decoders taehv
    python benchmarks/profile_bench.py --preset tiny --height 64 --width 64   # CPU smoke check

Defaults: on CUDA 21 and 120 latent frames (81 and 477 video frames), 2 timed runs after a warm-up;
on the CPU (a smoke check: no caps there) 6 latent frames, 1 timed run, no second cap. The whole
matrix on CUDA takes longer than one 10-minute device command: split it with --profiles/--decoders
and keep quality in each command that needs its reference (or share --work-dir between commands).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rf_core.config import StreamConfig, get_preset  # noqa: E402

ROW = "PROFILE_BENCH_ROW "  # marks a worker's result line on its stdout
PROFILES = {  # benchmark name -> apply_profile arguments
    "quality": dict(name="quality"),
    "low-vram": dict(name="low-vram"),
    "low-vram-kv8": dict(name="low-vram", kv_dtype="float8_e4m3fn"),
    "low-vram-resident": dict(name="low-vram", resident_blocks="all"),
    "turbo": dict(name="turbo"),
}
TARGET_CAP_GIB = {"wan": 6.0, "taehv": 4.5, "none": 4.5}  # issue 14's low-vram targets at 480x832
ERROR_CHUNKS = 7


# ---------------------------------------------------------------------------------------- worker
def make_decoder(kind: str, device, dtype, tiny: bool, info):
    """The decoder as today's fast path builds it, with the profile's decoder settings."""
    from rf_core.pipeline import AsyncDecoder
    from rf_core.profiles import profile_decoder
    from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder

    if kind == "none":
        return None
    torch.manual_seed(0)  # the same random decoder in every process
    if kind == "wan":
        from rf_core.vae.wan_vae import WanVAE, WanVAEConfig

        vae = WanVAE(WanVAEConfig(dim=8) if tiny else WanVAEConfig()).to(device, dtype)
        vae.eval().requires_grad_(False).make_fast(compile=device.type == "cuda")
        decoder = WanStreamDecoder(vae, latents_per_step=1)
    elif kind == "taehv":
        from rf_core.vae.taehv import TAEHV, TAEHVConfig

        taehv = TAEHV(TAEHVConfig(widths=(8, 8, 8, 8)) if tiny else TAEHVConfig()).to(device, dtype)
        decoder = TAEHVStreamDecoder(taehv.eval().requires_grad_(False))
    else:
        raise ValueError(f"unknown decoder {kind!r}; expected none, taehv or wan")
    return AsyncDecoder(profile_decoder(decoder, info), device)


def difference_run(session, decoder) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents of the first 7 chunks (float32, host) and their decoded frames (uint8, host)."""
    session.reset(0)
    if decoder is not None:
        decoder.reset()
    latents, frames = [], []
    for _ in range(ERROR_CHUNKS):
        z = session.next_chunk()
        latents.append(z.float().cpu())
        if decoder is not None:
            decoder.submit(z)
            frames.append(decoder.result())
    return torch.cat(latents, 1), (torch.cat(frames, 1) if frames else None)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR of uint8 frames in dB over the whole video; None when identical."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def worker(cfg: dict) -> dict:
    from stream_bench import run_once

    from rf_core.profiles import apply_profile
    from rf_core.stream import StreamSession
    from rf_core.tiny import random_model, random_prompt

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    row = {k: cfg[k] for k in ("profile", "decoder", "cap_gib")}
    if cuda and cfg["cap_gib"]:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg["cap_gib"] * 2**30 / total))
    elif cfg["cap_gib"]:
        row["note"] = "no cap on the CPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = get_preset(cfg["preset"])
    latent_hw = (cfg["height"] // 8, cfg["width"] // 8)
    work = Path(cfg["work_dir"])
    stage = "setup"
    try:
        model = random_model(preset, seed=0, device="cpu", dtype=dtype)  # same weights everywhere
        prompt = random_prompt(preset, tokens=40, seed=0).to(device, dtype)
        args = dict(PROFILES[cfg["profile"]])
        if "kv_dtype" in args:
            args["kv_dtype"] = getattr(torch, args["kv_dtype"])
        if args.get("resident_blocks") == "all":
            args["resident_blocks"] = preset.num_layers
        info = apply_profile(model, args.pop("name"), device, **args)
        row.update(profile_info=info.describe(), warnings=list(info.warnings), error_bound=info.error_bound)
        decoder = make_decoder(cfg["decoder"], device, dtype, cfg["preset"] == "tiny", info)
        session = StreamSession(model, prompt, latent_hw, StreamConfig(), seed=0)
        if session.cache.k.dtype != (info.kv_dtype or dtype):
            raise RuntimeError(
                f"StreamSession keeps the KV cache in {session.cache.k.dtype}, not the profile's "
                f"{info.kv_dtype}: it does not read model.kv_dtype yet"
            )
        row["setup_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

        stage = "difference"
        t0 = time.perf_counter()
        latents, frames = difference_run(session, decoder)  # also the warm-up of compiled kernels
        row["first_run_s"] = time.perf_counter() - t0
        torch.save(latents, work / f"latents_{cfg['profile']}.pt")
        if frames is not None:
            torch.save(frames, work / f"frames_{cfg['profile']}_{cfg['decoder']}.pt")
        ref = work / "latents_quality.pt"
        if ref.exists():
            q = torch.load(ref, weights_only=True)
            row["latent_rel_err_vs_quality"] = ((latents - q).norm() / q.norm()).item()
            row["within_bound"] = row["latent_rel_err_vs_quality"] <= info.error_bound
        resident = work / "latents_low-vram-resident.pt"
        if cfg["profile"] == "low-vram" and resident.exists():  # offload must change no number
            row["identical_to_low_vram_resident"] = torch.equal(
                latents, torch.load(resident, weights_only=True)
            )
        ref_frames = work / f"frames_quality_{cfg['decoder']}.pt"
        if frames is not None and ref_frames.exists():
            value = psnr(frames, torch.load(ref_frames, weights_only=True))
            row["psnr_vs_quality_db"] = value
            row["frames_identical_to_quality"] = value is None

        stage = "speed"
        runs = {}
        for frames_n in cfg["frames"]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            run_once(session, frames_n, decoder, sync, True)  # warm-up at this length
            timed = [run_once(session, frames_n, decoder, sync, True) for _ in range(cfg["repeats"])]
            best = sorted(timed, key=lambda r: r["total"])[len(timed) // 2]
            runs[str(frames_n)] = dict(
                video_frames=best["video_frames"],
                fps=best["video_frames"] / best["total"],
                ttff_s=best["ttff"],
                all_seconds=[r["total"] for r in timed],
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            )
        row.update(status="ok", runs=runs)
    except torch.OutOfMemoryError as err:
        row.update(status="oom", stage=stage, error=str(err).splitlines()[0])
    except Exception as err:  # one configuration's failure is a row, not the end of the benchmark
        row.update(status="error", stage=stage, error=f"{type(err).__name__}: {err}")
    if cuda:
        row["process_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["gpu"] = torch.cuda.get_device_name(0)
    row["torch"] = torch.__version__
    return row


# ---------------------------------------------------------------------------------------- parent
def configurations(args) -> list[dict]:
    profiles = args.profiles.split(",")
    decoders = args.decoders.split(",")
    for p in profiles:
        if p not in PROFILES:
            raise SystemExit(
                f"profile_bench: error: unknown profile {p!r}; expected some of {list(PROFILES)}"
            )
    for d in decoders:
        if d not in TARGET_CAP_GIB:
            raise SystemExit(
                f"profile_bench: error: unknown decoder {d!r}; expected some of none, taehv, wan"
            )
    # quality first (the reference), then low-vram-resident before low-vram (the offload check)
    first = ("quality", "low-vram-resident")
    order = sorted(profiles, key=lambda p: first.index(p) if p in first else len(first))
    out = []
    for d in decoders:
        for p in order:
            low = p.startswith("low-vram")
            out.append(
                dict(profile=p, decoder=d, cap_gib=(args.cap_gib or TARGET_CAP_GIB[d]) if low else None)
            )
        if args.small_cap_gib:
            out += [
                dict(profile=p, decoder=d, cap_gib=args.small_cap_gib)
                for p in order
                if p in ("low-vram", "low-vram-kv8")
            ]
    return out


def summary(rows: list[dict]) -> str:
    frames = sorted({int(k) for r in rows for k in r.get("runs", {})})
    head = ["profile", "decoder", "cap GiB", *[f"FPS {f}" for f in frames], *[f"peak {f}" for f in frames]]
    head += ["latent err", "PSNR dB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def num(v, fmt="{:.2f}"):
        return "—" if v is None else fmt.format(v)

    for r in rows:
        runs = r.get("runs", {})
        fps = [num(runs.get(str(f), {}).get("fps")) for f in frames]
        peak = [num(runs.get(str(f), {}).get("peak_gib")) for f in frames]
        err = r.get("latent_rel_err_vs_quality")
        err_s = num(err, "{:.2%}")
        psnr_s = (
            "identical"
            if r.get("frames_identical_to_quality")
            else num(r.get("psnr_vs_quality_db"), "{:.1f}")
        )
        status = (
            r["status"]
            if r["status"] == "ok"
            else f"{r['status']} ({r.get('stage')}): {r.get('error', '')[:80]}"
        )
        if r.get("identical_to_low_vram_resident") is False:
            status += "; offload changed the latents (must be bit-identical)"
        if r.get("within_bound") is False:
            status += f"; over the bound {r['error_bound']:.0%}"
        cap = num(r["cap_gib"], "{:g}")
        lines.append(
            "| " + " | ".join([r["profile"], r["decoder"], cap, *fps, *peak, err_s, psnr_s, status]) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default=",".join(PROFILES))
    p.add_argument("--decoders", default="none,taehv,wan")
    p.add_argument("--frames", type=int, action="append", help="latent frames per run (default 21 and 120)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 2 on CUDA, 1 on the CPU)")
    p.add_argument(
        "--cap-gib", type=float, default=None, help="cap for the low-vram profiles (default per decoder)"
    )
    p.add_argument(
        "--small-cap-gib",
        type=float,
        default=None,
        help="second cap for low-vram (default 3 on CUDA); 0: none",
    )
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument(
        "--work-dir", default=None, help="where quality's latents and frames are kept (default: temp)"
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(ROW + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    cuda = torch.cuda.is_available()
    frames = args.frames or ([21, 120] if cuda else [6])
    args.repeats = args.repeats or (2 if cuda else 1)
    if args.small_cap_gib is None:
        args.small_cap_gib = 3.0 if cuda else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        common = dict(
            frames=frames,
            repeats=args.repeats,
            preset=args.preset,
            height=args.height,
            width=args.width,
            work_dir=str(work),
        )
        rows = []
        for cfg in configurations(args):
            print(
                f"profile_bench: {cfg['profile']} x {cfg['decoder']}, cap {cfg['cap_gib']} GiB",
                file=sys.stderr,
                flush=True,
            )
            rows.append(run_worker({**common, **cfg}, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    print(summary(rows), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def run_worker(cfg: dict, timeout: float) -> dict:
    """One configuration in a fresh process; a crash or a timeout becomes a row too."""
    base = {k: cfg[k] for k in ("profile", "decoder", "cap_gib")}
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "stage": "process", "error": f"no result after {timeout:g} s"}
    for line in done.stdout.splitlines():
        if line.startswith(ROW):
            return json.loads(line[len(ROW) :])
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {**base, "status": "crashed", "stage": "process", "error": f"exit code {done.returncode}: {tail}"}


if __name__ == "__main__":
    main()
