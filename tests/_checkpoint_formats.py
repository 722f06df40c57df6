"""Test-side description of the checkpoint layouts, written from the sources (reference-algorithm.md
§1.2 and §6, diffusers' convert_wan_to_diffusers.py, ComfyUI's scaled-fp8 convention), independently
of rf_core.io.formats: tests build files with these and check that the loader undoes them."""

from __future__ import annotations

import torch

from rf_core.config import DiTConfig


def wan_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Wan2.1's state-dict keys and shapes, as tabulated in reference-algorithm.md §1.2."""
    d, f = cfg.dim, cfg.ffn_dim
    out = {
        "patch_embedding.weight": (d, cfg.in_dim, *cfg.patch_size),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        out[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                out[f"{b}{attn}.{p}.weight"] = (d, d)
                out[f"{b}{attn}.{p}.bias"] = (d,)
            out[f"{b}{attn}.norm_q.weight"] = (d,)
            out[f"{b}{attn}.norm_k.weight"] = (d,)
        out[b + "norm3.weight"] = (d,)
        out[b + "norm3.bias"] = (d,)
        out[b + "ffn.0.weight"] = (f, d)
        out[b + "ffn.0.bias"] = (f,)
        out[b + "ffn.2.weight"] = (d, f)
        out[b + "ffn.2.bias"] = (d,)
    out["head.modulation"] = (1, 2, d)
    out["head.head.weight"] = (cfg.out_dim * 4, d)
    out["head.head.bias"] = (cfg.out_dim * 4,)
    return out


# Wan -> diffusers WanTransformer3DModel module names (diffusers swaps norm2/norm3).
DIFFUSERS_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
DIFFUSERS_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def diffusers_name(wan: str) -> str:
    """diffusers name of a Wan module or parameter name."""
    parts = wan.split(".")
    if parts[0] == "blocks":
        pre, rest, table = ".".join(parts[:2]) + ".", ".".join(parts[2:]), DIFFUSERS_BLOCK
    else:
        pre, rest, table = "", wan, DIFFUSERS_TOP
    for src in sorted(table, key=len, reverse=True):
        if rest == src or rest.startswith(src + "."):
            return pre + table[src] + rest[len(src) :]
    raise KeyError(wan)


def fsdp_name(wan: str) -> str:
    """A key as an FSDP + activation-checkpointed + compiled training wrapper names it."""
    if wan.startswith("blocks."):
        _, i, rest = wan.split(".", 2)
        return f"model._fsdp_wrapped_module.blocks.{i}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
    return f"model._orig_mod.{wan}"


FP8_MAX = 448.0  # largest float8_e4m3fn value


def scaled_fp8(sd: dict[str, torch.Tensor], prefix: str = "model.diffusion_model."):
    """ComfyUI scaled-fp8 file of ``sd`` (Linear weights in float8 with a float32 ``scale_weight``,
    everything else in bf16, a ``scaled_fp8`` marker) and the weights it stands for
    (fp8 value x scale), computed here in float64."""
    out, dequant = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max().double() / FP8_MAX
            q = (v.double() / scale).to(torch.float8_e4m3fn)
            out[prefix + k] = q
            out[prefix + k[: -len(".weight")] + ".scale_weight"] = scale.float()
            dequant[k] = (q.double() * scale.float().double()).float()
        else:
            out[prefix + k] = v.to(torch.bfloat16)
            dequant[k] = v.to(torch.bfloat16).float()
    return out, dequant
