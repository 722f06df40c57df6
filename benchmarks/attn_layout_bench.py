"""Which SDPA kernel runs, and how fast, for the chunk's self-attention with our cache layouts.

q [1, 4680, 12, 128] attends k/v of 14040 keys (``--keys 512``: the cross-attention). Layouts: the transposed views the model passes today
([B, L, H, D] buffers), and contiguous [B, H, L, D]. Prints ms per call for each backend (median).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[n // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--keys", type=int, default=14040)
    lk = p.parse_args().keys
    d = torch.device("cuda")
    bf = torch.bfloat16
    lq, h, hd = 4680, 12, 128
    buf = torch.randn(1, lk, h, hd, device=d, dtype=bf)
    q_blhd = torch.randn(1, lq, h, hd, device=d, dtype=bf)
    layouts = {
        "blhd_view": (q_blhd.transpose(1, 2), buf.transpose(1, 2), buf.transpose(1, 2)),
        "bhld_contig": tuple(t.transpose(1, 2).contiguous() for t in (q_blhd, buf, buf)),
        "bhld_slice_of_larger": (
            q_blhd.transpose(1, 2).contiguous(),
            torch.randn(1, h, lk + 4680, hd, device=d, dtype=bf)[:, :, :lk],
            torch.randn(1, h, lk + 4680, hd, device=d, dtype=bf)[:, :, :lk],
        ),
    }
    out = {}
    for lname, (q, k, v) in layouts.items():
        for bname, be in [
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ]:
            try:
                with sdpa_kernel([be]):
                    out[f"{lname}/{bname}"] = bench(
                        lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
                    )
            except Exception as e:
                out[f"{lname}/{bname}"] = f"unavailable: {str(e).splitlines()[0][:120]}"
        out[f"{lname}/default"] = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel(
            [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
            set_priority=True,
        ):
            out[f"{lname}/cudnn_priority"] = bench(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
            )
    print(json.dumps({"keys": lk, **out}, indent=1))


if __name__ == "__main__":
    main()
