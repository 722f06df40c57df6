"""The DiT checkpoint layouts in the wild, and how each maps onto Wan2.1's own key names.

Everything here works on names and shapes only (``LazyTensor``), so it runs on files of any size
and on meta tensors. Layouts (docs/formats.md has the user-facing table):

* ``wan``: Wan2.1's original names (``blocks.0.self_attn.q.weight``...), as in
  ``diffusion_pytorch_model.safetensors``, ComfyUI's ``diffusion_models`` files and our own
  converted files.
* ``training``: Self-Forcing / Reward Forcing / CausVid / LongLive training checkpoints: the
  wrapper's ``model.`` prefix, FSDP/activation-checkpoint/compile wrapper names anywhere in the key,
  often nested under ``generator`` / ``generator_ema`` / ``model`` / ``state_dict``.
* ``comfyui``: full ComfyUI checkpoints with ``model.diffusion_model.`` (or ``diffusion_model.``).
* ``diffusers``: ``WanTransformer3DModel`` names (``condition_embedder.*``, ``attn1.to_q``...).

Any of them may be float8 (``float8_e4m3fn``/``e5m2``), optionally with ComfyUI's per-tensor scales
(``<layer>.scale_weight`` + a ``scaled_fp8`` marker, or ``<layer>.weight_scale`` + a
``<layer>.comfy_quant`` JSON tag); the loader dequantises ``weight = fp8 * scale``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from rf_core.config import PRESETS, DiTConfig
from rf_core.io.safe_load import CheckpointError, LazyTensor, TensorTree

FORMATS = ("wan", "training", "comfyui", "diffusers")
FORMAT_ALIASES = {
    "auto": "auto",
    "wan": "wan",
    "original": "wan",
    "canonical": "wan",
    "training": "training",
    "rewardforcing": "training",
    "self-forcing": "training",
    "selfforcing": "training",
    "causvid": "training",
    "longlive": "training",
    "comfyui": "comfyui",
    "comfy": "comfyui",
    "diffusers": "diffusers",
}

# Where training checkpoints nest the generator (reference-algorithm.md §6.2-6.4).
SECTIONS = ("generator_ema", "generator", "model", "state_dict")
LORA_SECTIONS = ("generator_lora",)
# Wrapper names that FSDP, activation checkpointing, torch.compile and DDP put into parameter names.
WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Activation scales are only used by fp8 matmul kernels; dequantised weights do not need them.
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
QUANT_TAG_SUFFIX = ".comfy_quant"
# Keys of fp8 files that hold quantisation bookkeeping rather than weights.
FP8_BOOKKEEPING_SUFFIXES = (*SCALE_SUFFIXES, *INPUT_SCALE_SUFFIXES, QUANT_TAG_SUFFIX)
SCALED_FP8_MARKER = "scaled_fp8"
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_unet_", ".lora.down.", ".lora.up.")

# diffusers WanTransformer3DModel module names -> Wan names (diffusers' convert_wan_to_diffusers.py
# renames in the other direction; diffusers swaps Wan's norm2/norm3, so its ``norm2`` is our ``norm3``).
_DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_DIFFUSERS_BLOCK = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def normalize_format(name: str) -> str:
    key = name.lower().replace("_", "-")
    if key not in FORMAT_ALIASES:
        raise ValueError(f"unknown checkpoint format {name!r}; expected one of {sorted(FORMAT_ALIASES)}")
    return FORMAT_ALIASES[key]


def diffusers_to_wan(name: str) -> str | None:
    """Wan name of a diffusers module or parameter name, or None when it has no Wan counterpart."""
    m = _BLOCK_NAME.fullmatch(name)
    table, rest, pre = (_DIFFUSERS_BLOCK, m[2], f"blocks.{m[1]}.") if m else (_DIFFUSERS_TOP, name, "")
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return pre + dst + rest[len(src) :]
    return None


def strip_wrappers(key: str) -> str:
    """Remove FSDP/checkpoint/compile wrapper names and one leading ``module.``/``model.``."""
    for tok in WRAPPER_TOKENS:
        key = key.replace(tok, "")
    for pre in ("module.", "model."):
        if key.startswith(pre):
            key = key[len(pre) :]
            break
    return key


def to_wan_key(key: str, fmt: str) -> str:
    """The Wan name of a checkpoint key in layout ``fmt`` (unchanged where no rule applies, so an
    unknown key keeps its name for the error message)."""
    if fmt == "training":
        return strip_wrappers(key)
    if fmt == "comfyui":
        for pre in COMFY_PREFIXES:
            if key.startswith(pre):
                return key[len(pre) :]
        return key
    if fmt == "diffusers":
        return diffusers_to_wan(key) or key
    return key


def looks_like_lora(keys) -> bool:
    return any(any(m in k for m in _LORA_MARKERS) for k in keys)


def select_section(
    tree: TensorTree, source: str, prefer_ema: bool = True, section: str | None = None
) -> tuple[dict[str, LazyTensor], str | None]:
    """The flat generator state dict of a (possibly nested) checkpoint and the section it came from.

    Sections are tried in the order generator_ema, generator, model, state_dict (generator before
    generator_ema when ``prefer_ema`` is False); ``section`` forces one ("a/b" for deeper nesting).
    """
    chosen: list[str] = []
    node: Mapping = tree
    if section is not None:
        for part in section.split("/"):
            sub = node.get(part)
            if not isinstance(sub, Mapping):
                avail = [k for k, v in node.items() if isinstance(v, Mapping)]
                raise CheckpointError(
                    f"{source}: has no section {section!r} (nested sections here: {avail or 'none'})"
                )
            node = sub
            chosen.append(part)
    else:
        order = SECTIONS if prefer_ema else ("generator", "generator_ema", "model", "state_dict")
        for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
            if any(isinstance(v, LazyTensor) for v in node.values()):
                break
            sub = next(
                ((k, node[k]) for k in order if isinstance(node.get(k), Mapping) and len(node[k])), None
            )
            if sub is None:
                break
            chosen.append(sub[0])
            node = sub[1]
    flat: dict[str, LazyTensor] = {}
    for k, v in node.items():
        if isinstance(v, LazyTensor):
            flat[k] = v
        elif isinstance(v, Mapping):
            if k in LORA_SECTIONS or looks_like_lora(v.keys()):
                raise CheckpointError(
                    f"{source}: holds a LoRA adapter ({'/'.join([*chosen, k])}) and no full model "
                    "weights: load the base model and pass this file as a LoRA (loras=... / --lora)"
                )
            if section is None and k in ("critic", "fake_score", "optimizer", "generator_optimizer"):
                continue  # other models and optimiser states saved next to the generator
            raise CheckpointError(
                f"{source}: unexpected nested entry {'/'.join([*chosen, k])!r}; sections found: "
                f"{[n for n, s in node.items() if isinstance(s, Mapping)]} (choose one with section=)"
            )
        else:
            raise CheckpointError(
                f"{source}: entry {'/'.join([*chosen, k])!r} is a {type(v).__name__}, not a tensor"
            )
    return flat, "/".join(chosen) or None


def detect_format(keys, source: str, nested: bool = False) -> str:
    """The layout of a flat key set (``nested``: it came from a section of a training checkpoint)."""
    keys = list(keys)
    if looks_like_lora(keys):
        sample = next(k for k in keys if any(m in k for m in _LORA_MARKERS))
        raise CheckpointError(
            f"{source}: this is a LoRA adapter (e.g. key {sample!r}), not full model weights: load the "
            "base model and pass this file as a LoRA (loras=... / --lora)"
        )
    if any(k.startswith(COMFY_PREFIXES) for k in keys):
        return "comfyui"
    if any(
        k.startswith("condition_embedder.")
        or k.startswith("proj_out.")
        or ".attn1." in k
        or k == "scale_shift_table"
        for k in keys
    ):
        return "diffusers"
    if nested or any(
        k.startswith(("model.", "module.")) or any(t in k for t in WRAPPER_TOKENS) for k in keys
    ):
        return "training"
    if "patch_embedding.weight" in keys or "head.modulation" in keys:
        return "wan"
    raise CheckpointError(
        f"{source}: unknown checkpoint format: no Wan2.1 DiT layout matches (first keys: {keys[:6]}). "
        f"Known layouts: {', '.join(FORMATS)}"
    )


@dataclass
class Canonical:
    """A checkpoint in Wan names: weights, per-tensor fp8 scales, and what was set aside."""

    weights: dict[str, LazyTensor]
    scales: dict[str, LazyTensor] = field(default_factory=dict)
    quantization: str | None = None  # None, "fp8" or "scaled-fp8"
    ignored: list[str] = field(default_factory=list)


def canonicalize(flat: Mapping[str, LazyTensor], fmt: str, source: str) -> Canonical:
    """Rename every key to its Wan name and separate fp8 scale bookkeeping from weights.
    Two file keys landing on one Wan name is an error (e.g. a file with two copies of the model)."""
    out = Canonical({})
    origin: dict[str, str] = {}
    marker = False
    for key, t in flat.items():
        last = key.rsplit(".", 1)[-1]
        if last == SCALED_FP8_MARKER:
            marker = True
            out.ignored.append(key)
            continue
        if key.endswith(QUANT_TAG_SUFFIX):
            _check_comfy_quant(key, t, source)
            out.ignored.append(key)
            continue
        if key.endswith(".weight_scale_2"):
            raise CheckpointError(
                f"{source}: key {key!r}: block-scaled 4-bit weights (nvfp4) are not supported; use an "
                "fp8, fp16, bf16 or fp32 file"
            )
        if key.endswith(INPUT_SCALE_SUFFIXES):
            out.ignored.append(key)
            continue
        scale_sfx = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        target = key[: -len(scale_sfx)] + ".weight" if scale_sfx else key
        wan = to_wan_key(target, fmt)
        store = out.scales if scale_sfx else out.weights
        if wan in store:
            raise CheckpointError(
                f"{source}: keys {origin[('s' if scale_sfx else 'w') + wan]!r} and {key!r} both map to {wan!r}"
            )
        store[wan] = t
        origin[("s" if scale_sfx else "w") + wan] = key
    for wan, s in out.scales.items():
        if wan not in out.weights:
            raise CheckpointError(f"{source}: scale {origin['s' + wan]!r} has no weight {wan!r}")
        check_fp8_scale(s, out.weights[wan], source, origin["s" + wan], origin["w" + wan])
    if any(t.dtype in FP8_DTYPES for t in out.weights.values()):
        out.quantization = "scaled-fp8" if (out.scales or marker) else "fp8"
    return out


def scale_key_of(weight_key: str, keys: Container[str]) -> str | None:
    """The key of ``weight_key``'s per-tensor fp8 scale among ``keys``, or None when it has none."""
    base = weight_key.removesuffix(".weight")
    return next((base + sfx for sfx in SCALE_SUFFIXES if base + sfx in keys), None)


def check_fp8_scale(
    scale: LazyTensor, weight: LazyTensor, source: str, scale_key: str, weight_key: str
) -> None:
    """A weight's fp8 scale must be a single value or one per output row (block-wise scales, which
    need their own kernels, are refused)."""
    rows = weight.shape[0] if weight.shape else 1
    if scale.numel not in (1, rows):
        raise CheckpointError(
            f"{source}: scale {scale_key!r} has shape {list(scale.shape)} ({scale.numel} values); expected 1 "
            f"or one per output row of {weight_key!r} ({rows}); block-wise scales are not supported"
        )


def dequantize(
    weight: LazyTensor,
    scale: LazyTensor | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``weight * scale`` (computed in float32) on ``device`` in ``dtype``; without a scale, the weight
    converted. ``scale`` has been checked by ``check_fp8_scale``: one value or one per output row."""
    if scale is None:
        return weight.load_as(device, dtype)
    t = weight.load_as(device, torch.float32)
    s = scale.load().to(t.device, torch.float32)
    s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (t.ndim - 1)))
    return (t * s).to(dtype)


def _check_comfy_quant(key: str, t: LazyTensor, source: str) -> None:
    try:
        conf = json.loads(bytes(t.load().to(torch.uint8).flatten().tolist()))
        fmt = conf.get("format")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: key {key!r}: unreadable quantisation tag ({e})") from e
    if fmt not in _FP8_FORMATS:
        raise CheckpointError(
            f"{source}: key {key!r}: quantisation format {fmt!r} is not supported (supported: {_FP8_FORMATS})"
        )


# ----------------------------------------------------------------------------------- model shape
_SHAPE_FIELDS = (
    "dim",
    "ffn_dim",
    "num_heads",
    "num_layers",
    "freq_dim",
    "text_dim",
    "in_dim",
    "out_dim",
    "patch_size",
)


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source}: cannot infer the model size: key {key!r} is missing")
    s = tuple(shapes[key])
    if len(s) != ndim:
        raise CheckpointError(f"{source}: key {key!r} has shape {list(s)}, expected {ndim} dimensions")
    return s


def infer_config(shapes: Mapping[str, tuple[int, ...]], source: str) -> DiTConfig:
    """DiTConfig from Wan-named weight shapes. A preset with the same shapes is returned as is (it
    also fixes ``text_len``, which no weight reveals); otherwise ``text_len`` is Wan's 512."""
    dim, in_dim, *patch = _need(shapes, "patch_embedding.weight", 5, source)
    ffn_dim = _need(shapes, "blocks.0.ffn.0.weight", 2, source)[0]
    text_dim = _need(shapes, "text_embedding.0.weight", 2, source)[1]
    freq_dim = _need(shapes, "time_embedding.0.weight", 2, source)[1]
    head_out = _need(shapes, "head.head.weight", 2, source)[0]
    n_patch = patch[0] * patch[1] * patch[2]
    if dim % 128 or head_out % n_patch:
        raise CheckpointError(
            f"{source}: unsupported shapes: width {dim} is not a multiple of the head size 128, or the "
            f"head's {head_out} outputs do not split into patches of {n_patch}"
        )
    blocks = {int(m[1]) for k in shapes if (m := _BLOCK_NAME.fullmatch(k))}
    cfg = DiTConfig(
        dim=dim,
        ffn_dim=ffn_dim,
        num_heads=dim // 128,
        num_layers=max(blocks) + 1,
        freq_dim=freq_dim,
        text_dim=text_dim,
        in_dim=in_dim,
        out_dim=head_out // n_patch,
        patch_size=tuple(patch),
    )
    for preset in PRESETS.values():
        if shape_fields(preset) == shape_fields(cfg):
            return preset
    return cfg


def shape_fields(cfg: DiTConfig) -> dict[str, object]:
    return {f: getattr(cfg, f) for f in _SHAPE_FIELDS}


def check_against(cfg: DiTConfig, wanted: DiTConfig, what: str, source: str) -> None:
    """Error when ``wanted`` (a preset or config file) disagrees with the weights' shapes."""
    diffs = [
        f"{f} is {a} in the file but {b} in {what}"
        for f, a, b in ((f, getattr(cfg, f), getattr(wanted, f)) for f in _SHAPE_FIELDS)
        if a != b
    ]
    if diffs:
        raise CheckpointError(f"{source}: does not match {what}: " + "; ".join(diffs))


def read_config_json(path: Path, strict: bool = False) -> dict[str, object] | None:
    """DiTConfig fields from a Wan (``WanModel``) or diffusers (``WanTransformer3DModel``) config.json.
    A file that is unreadable or describes something else gives None, or an error when ``strict``
    (a config the user named)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if strict:
            raise CheckpointError(f"{path}: unreadable config file ({e})") from e
        return None
    if not isinstance(raw, dict):
        raw = {}
    cls = raw.get("_class_name")
    if raw.get("model_type") not in (None, "t2v"):
        raise CheckpointError(
            f"{path}: model_type is {raw['model_type']!r}; only text-to-video (t2v) Wan models are supported"
        )
    if cls == "WanTransformer3DModel":
        heads, head_dim = raw.get("num_attention_heads"), raw.get("attention_head_dim")
        out = {
            "num_heads": heads,
            "dim": heads * head_dim if heads and head_dim else None,
            "ffn_dim": raw.get("ffn_dim"),
            "num_layers": raw.get("num_layers"),
            "freq_dim": raw.get("freq_dim"),
            "text_dim": raw.get("text_dim"),
            "in_dim": raw.get("in_channels"),
            "out_dim": raw.get("out_channels"),
            "patch_size": raw.get("patch_size"),
            "eps": raw.get("eps"),
        }
    elif cls == "WanModel" or {"dim", "num_heads", "num_layers"} <= raw.keys():
        names = {f.name for f in fields(DiTConfig)}
        out = {k: v for k, v in raw.items() if k in names}
    elif strict:
        raise CheckpointError(
            f"{path}: not a Wan2.1 model config (no _class_name WanModel or dim/num_heads/num_layers)"
        )
    else:
        return None
    return {k: v for k, v in out.items() if v is not None}


def apply_config_json(cfg: DiTConfig, values: Mapping[str, object], path: Path, source: str) -> DiTConfig:
    """Check the config file's shape fields against the weights; take its other fields (text_len, eps)."""
    values = {k: tuple(v) if k == "patch_size" else v for k, v in values.items()}
    diffs = [
        f"{k} is {getattr(cfg, k)} in the weights but {v} in the config"
        for k, v in values.items()
        if k in _SHAPE_FIELDS and getattr(cfg, k) != v
    ]
    if diffs:
        raise CheckpointError(f"{path} does not agree with {source}: " + "; ".join(diffs))
    extra = {k: v for k, v in values.items() if k not in _SHAPE_FIELDS}
    return replace(cfg, **extra) if extra else cfg
