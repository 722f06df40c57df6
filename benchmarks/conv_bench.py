"""The Wan decoder's 3x3x3 causal convolutions, one formulation against another (bf16, CUDA).

About 95% of the decoder's FLOPs are four conv shapes (96 channels at 480x832, 192 at 240x416,
384 at 120x208 and 60x104). For each shape this times, with CUDA events (median), the same maths
written three ways and checks them against each other:

- conv3d: ``F.conv3d`` on channels-last-3d input (what ``WanVAE.make_fast`` runs);
- stacked: the three time taps stacked along channels, then one 2-D conv with 3x the input
  channels (``[T, 3C, H, W]``; the stacking copy is timed too);
- taps: three 2-D convs over zero-copy frame views, summed.

    python benchmarks/conv_bench.py --frames 4 --frames 12
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

SHAPES = ((96, 480, 832), (192, 240, 416), (384, 120, 208), (384, 60, 104))


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, action="append", help="output frames per call")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    for t_out in args.frames or [4]:
        for c, h, w in SHAPES:
            print(json.dumps(bench_shape(c, h, w, t_out, args.reps)), flush=True)
            torch.cuda.empty_cache()


def bench_shape(c: int, h: int, w: int, t_out: int, reps: int) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(1, c, t_out + 2, h, w, device=dev, dtype=dt).contiguous(
        memory_format=torch.channels_last_3d
    )
    wt = (torch.randn(c, c, 3, 3, 3, device=dev, dtype=dt) / (27 * c) ** 0.5).contiguous(
        memory_format=torch.channels_last_3d
    )
    bias = torch.randn(c, device=dev, dtype=dt)
    # [Cout, Cin, kt, kh, kw] -> [Cout, kt * Cin, kh, kw]: tap kt reads frame t + kt
    w2 = wt.permute(0, 2, 1, 3, 4).reshape(c, 3 * c, 3, 3).contiguous(memory_format=torch.channels_last)
    taps = [wt[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
    frames = x[0].permute(1, 0, 2, 3)  # [T, C, H, W], channels-last, no copy

    def conv3d():
        return F.conv3d(x, wt, bias, padding=(0, 1, 1))[0].permute(1, 0, 2, 3)

    def stacked():
        xs = torch.cat([frames[k : k + t_out] for k in range(3)], dim=1)
        return F.conv2d(xs, w2, bias, padding=1)

    def tapsum():
        out = F.conv2d(frames[0:t_out], taps[0], bias, padding=1)
        out += F.conv2d(frames[1 : 1 + t_out], taps[1], None, padding=1)
        out += F.conv2d(frames[2 : 2 + t_out], taps[2], None, padding=1)
        return out

    variants = {"conv3d": conv3d, "stacked": stacked, "taps": tapsum}
    ref = conv3d().float()
    flop = 2 * c * c * 27 * t_out * h * w
    row = dict(channels=c, hw=[h, w], frames_out=t_out, gflop=flop / 1e9)
    for name, fn in variants.items():
        row[name + "_rel_err"] = ((fn().float() - ref).norm() / ref.norm()).item()
        ms = time_ms(fn, reps)
        row[name + "_ms"] = round(ms, 3)
        row[name + "_tflops"] = round(flop / ms / 1e9, 1)
    return row


if __name__ == "__main__":
    main()
