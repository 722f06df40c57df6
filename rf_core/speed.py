"""Speed switches for inference. Each keeps the maths: the optimised model equals the plain one
within bf16 rounding (tests/test_speed_equivalence.py checks it on CPU)."""

from __future__ import annotations

import torch

from rf_core.model.dit import WanDiT


def make_fast(
    model: WanDiT,
    *,
    compile: bool = True,
    rope_fp32: bool = True,
    attn_backend: str | None = None,
    compile_mode: str | None = None,
) -> WanDiT:
    """Switch a model (in place) to the fast inference path.

    rope_fp32: RoPE in float32 instead of the reference's float64 (the result is rounded to the
        model dtype either way). compile: torch.compile the pure-tensor halves of each block.
    """
    if rope_fp32:
        model.set_rope_precision(torch.float32)
    if attn_backend is not None:
        model.attn_backend = attn_backend
    if compile and not model.compiled:
        kwargs = {"mode": compile_mode} if compile_mode else {}
        model.compile_blocks(**kwargs)
    return model
