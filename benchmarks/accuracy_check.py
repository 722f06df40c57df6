"""bf16 error of the plain and fast paths against an fp32 run of the same random 1.3B model.

Prints the relative L2 error of the first five chunks (same seed and noise; chunks 3 and 4 evict into
the EMA sink, so the fast path's key rotations are exercised) for: plain bf16, fast bf16, and the
opt-in fp8 path (its quality cost).
If fast's error is of the same size as plain's, the optimisations cost no accuracy beyond bf16's own.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rf_core.config import get_preset  # noqa: E402
from rf_core.speed import make_fast  # noqa: E402
from rf_core.stream import StreamSession  # noqa: E402
from rf_core.tiny import random_model, random_prompt  # noqa: E402

CHUNKS = 5


def chunks(model, prompt, noise, renoise, n=CHUNKS):
    s = StreamSession(model, prompt, (60, 104), seed=0)
    with torch.no_grad():
        return torch.cat(
            [
                s.next_chunk(noise[c].to(model.dtype), [r.to(model.dtype) for r in renoise[c]])
                for c in range(n)
            ],
            1,
        ).float()


def main():
    cfg = get_preset("wan2.1-t2v-1.3b")
    g = torch.Generator("cuda").manual_seed(1)
    noise = [torch.randn(1, 3, 16, 60, 104, device="cuda", generator=g) for _ in range(CHUNKS)]
    renoise = [
        [torch.randn(1, 3, 16, 60, 104, device="cuda", generator=g) for _ in range(3)] for _ in range(CHUNKS)
    ]
    prompt = random_prompt(cfg, tokens=40).cuda()
    ref_model = random_model(cfg, seed=0, device="cuda", dtype=torch.float32, attn_backend="sdpa")
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = chunks(ref_model, prompt, noise, renoise)
    del ref_model
    out = {}
    model = random_model(cfg, seed=0, device="cuda", dtype=torch.bfloat16, attn_backend="sdpa")
    plain = chunks(model, prompt.bfloat16(), noise, renoise)
    out["plain_bf16_rel_err"] = ((plain - ref).norm() / ref.norm()).item()
    make_fast(model, attn_backend="auto")
    fast = chunks(model, prompt.bfloat16(), noise, renoise)
    out["fast_bf16_rel_err"] = ((fast - ref).norm() / ref.norm()).item()
    out["fast_vs_plain_rel"] = ((fast - plain).norm() / plain.norm()).item()
    del model
    model = random_model(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    make_fast(model, attn_backend="auto", fp8=True)
    fp8 = chunks(model, prompt.bfloat16(), noise, renoise)
    out["fast_fp8_rel_err"] = ((fp8 - ref).norm() / ref.norm()).item()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
