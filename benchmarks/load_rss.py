"""Peak resident memory (ru_maxrss) of loading a full-size Wan2.1-T2V-1.3B DiT on CPU, vs file size.

Writes a synthetic random 1.3B checkpoint (same keys and shapes as the real one) once, then loads it
in a fresh subprocess per method, so each peak is measured alone:

    python benchmarks/load_rss.py [--dir /tmp/rf_load_rss] [--methods ours-bf16 ours-fp32 ours-pt naive]

  ours-bf16  load_dit(<bf16 .safetensors>)                        (same dtype: no conversion)
  ours-fp32  load_dit(<bf16 .safetensors>, dtype=float32)         (converted while reading)
  ours-pt    load_dit(<bf16 torch.save .pt>)                      (pickle, memory-mapped)
  naive      WanDiT(cfg) in bf16 + safetensors.torch.load_file + load_state_dict (for comparison)

"extra" is the peak minus the process's peak before loading (torch and rf_core imported).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("ours-bf16", "ours-fp32", "ours-pt", "naive")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hwm_mib() -> float:
    """VmHWM: this process image's own peak (ru_maxrss can carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_files(d: Path) -> tuple[Path, Path]:
    from rf_core.config import get_preset
    from rf_core.io.checkpoints import expected_shapes
    from rf_core.io.safe_load import write_safetensors

    st, pt = d / "wan13b_bf16.safetensors", d / "wan13b_bf16.pt"
    shapes = expected_shapes(get_preset("wan2.1-t2v-1.3b"))
    g = torch.Generator().manual_seed(0)
    if not st.exists():
        layout = {k: (s, torch.bfloat16) for k, s in shapes.items()}
        write_safetensors(st, layout, lambda k: torch.randn(shapes[k], generator=g).to(torch.bfloat16))
    if not pt.exists():
        from rf_core.io.safe_load import SafetensorsFile

        f = SafetensorsFile(st)
        torch.save({"generator": {"model." + k: f.read(k) for k in shapes}}, pt)
    return st, pt


def child(method: str, st: Path, pt: Path) -> dict:
    from rf_core.io.checkpoints import load_dit
    from rf_core.model.dit import WanDiT

    base, base_hwm = peak_mib(), hwm_mib()
    t0 = time.perf_counter()
    if method == "ours-bf16":
        model = load_dit(st)
    elif method == "ours-fp32":
        model = load_dit(st, dtype=torch.float32)
    elif method == "ours-pt":
        model = load_dit(pt)
    else:
        from safetensors.torch import load_file

        from rf_core.config import get_preset

        torch.set_default_dtype(torch.bfloat16)
        model = WanDiT(get_preset("wan2.1-t2v-1.3b"))
        model.load_state_dict(load_file(st))
    seconds = time.perf_counter() - t0
    for p in model.parameters():  # read every weight, as a forward pass or a copy to the GPU would
        p.sum()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"method": method, "seconds": round(seconds, 1), "model_mib": round(weights),
            "ru_maxrss_mib": round(peak_mib()), "extra_mib": round(peak_mib() - base),
            "vmhwm_mib": round(hwm_mib()), "vmhwm_extra_mib": round(hwm_mib() - base_hwm)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/rf_load_rss")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--child", choices=(*METHODS, "make"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = Path(args.dir)
    st, pt = d / "wan13b_bf16.safetensors", d / "wan13b_bf16.pt"
    if args.child == "make":
        make_files(d)
        return
    if args.child:
        print(json.dumps(child(args.child, st, pt)))
        return
    d.mkdir(parents=True, exist_ok=True)
    # in a subprocess, so that this process stays small and its children's peaks are their own
    subprocess.run([sys.executable, __file__, "--dir", str(d), "--child", "make"], check=True)
    print(
        f"file: {st.stat().st_size / 2**20:.0f} MiB (.safetensors), {pt.stat().st_size / 2**20:.0f} MiB (.pt)"
    )
    for m in args.methods:
        out = subprocess.run(
            [sys.executable, __file__, "--dir", str(d), "--child", m], capture_output=True, text=True
        )
        if out.returncode:
            print(m, "failed:", out.stderr[-2000:])
            continue
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
