"""Speed switches for inference. All but ``fp8`` keep the maths: the optimised model equals the plain
one within bf16 rounding (tests/test_speed_equivalence.py checks it on CPU); fp8 is opt-in."""

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
    fp8: bool = False,
    roped_keys: bool = True,
    cuda_graphs: bool = False,
    gelu_epilogue: bool = True,
) -> WanDiT:
    """Switch a model (in place) to the fast inference path.

    rope_fp32: RoPE in float32 instead of the reference's float64 (the result is rounded to the
        model dtype either way). compile: torch.compile the pure-tensor halves of each block.
        fp8: opt-in fp8 GEMMs for the block linears; changes the output (rf_core/model/fp8.py).
        Apply LoRAs before it.
        roped_keys: streams keep their cached keys roped (``SinkKVCache`` key storage "roped"):
            a pass ropes only its own keys and writes them into the cache from the compiled kernel.
        cuda_graphs: streams on CUDA replay each repeating pass as a CUDA graph (rf_core/graphs.py).
        gelu_epilogue: on CUDA, the FFN's GELU runs in the up-projection GEMM's epilogue (GELU of
            the float32 accumulator instead of the bf16-rounded output: within bf16 rounding).
    """
    if cuda_graphs and model.offload is not None:
        raise ValueError(
            "CUDA graphs cannot follow block offload (its copies and weight pointers change during a pass); "
            "pass cuda_graphs=False"
        )
    if fp8:
        from rf_core.model.fp8 import use_fp8_linears

        if model.compiled:
            raise ValueError("enable fp8 before compiling the model")
        use_fp8_linears(model)
    if rope_fp32:
        model.set_rope_precision(torch.float32)
    model.key_storage = "roped" if roped_keys else "raw"
    model.cuda_graphs = cuda_graphs
    for blk in model.blocks:
        blk.gelu_epilogue = gelu_epilogue
    if attn_backend is not None:
        model.attn_backend = attn_backend
    if compile and not model.compiled:
        kwargs = {"mode": compile_mode} if compile_mode else {}
        model.compile_blocks(**kwargs)
    return model
