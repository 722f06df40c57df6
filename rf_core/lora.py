"""LoRA adapters for the Wan DiT: load the common layouts into one form, apply (removably), merge, save.

Internal form: ``Lora.layers`` maps a Wan module name (``blocks.0.self_attn.q``; for a bare
parameter such as ``blocks.0.modulation`` its own name) to a ``LoraLayer``: ``down`` (A, [rank, in]),
``up`` (B, [out, rank]), ``alpha`` (the update is ``alpha / rank * B @ A``; None means alpha = rank),
and optional full deltas ``diff`` (of the weight or bare parameter) and ``diff_bias``.

Layouts read (docs/formats.md):

* peft: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (also ``.lora_A.default.``),
  alpha from ``adapter_config.json`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) or the
  safetensors metadata diffusers writes (``lora_adapter_metadata``), else alpha = rank. LongLive's
  ``lora.pt`` is this layout nested under ``generator_lora``.
* kohya / ComfyUI: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``lora_up`` / ``.alpha``,
  and ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (+ ``.alpha``, ``.diff``, ``.diff_b``).
* diffusers: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (``lora_B.bias`` = bias delta).

Keys that fit none of these are an error (or, with ``strict=False``, listed in ``Lora.unknown_keys``).

Runtime application keeps the original tensors: ``apply_lora`` computes ``W + strength * delta`` once
and swaps it into each parameter's ``.data``; ``remove_lora`` swaps the very same original tensors
back, so removal is bit-exact and forward passes cost nothing extra. The price is one extra copy of
each targeted weight while a LoRA is applied; ``merge_lora`` updates the weights in place instead
(no extra memory, not removable). ``save_lora`` writes the ComfyUI layout with ``diffusion_model.``
keys and explicit alphas, which ComfyUI's own LoRA loader also reads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rf_core.io.formats import WRAPPER_TOKENS, diffusers_to_wan
from rf_core.io.safe_load import CheckpointError, LazyTensor, TensorTree, read_tensor_file, save_tensors


class LoraError(CheckpointError):
    """A LoRA file or LoRA/model combination that cannot be used; the message names file and key."""


_BLOCK_MODULES = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "self_attn.norm_q", "self_attn.norm_k",
    "norm3",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.norm_q", "cross_attn.norm_k",
    "ffn.0", "ffn.2", "modulation",
)  # fmt: skip
_TOP_MODULES = (
    "patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
    "time_projection.1", "head.head", "head.modulation",
)  # fmt: skip
_KOHYA_BLOCK = {m.replace(".", "_"): m for m in _BLOCK_MODULES}
_KOHYA_TOP = {m.replace(".", "_"): m for m in _TOP_MODULES}
_WAN_MODULE = re.compile(
    rf"blocks\.\d+\.({'|'.join(map(re.escape, _BLOCK_MODULES))})|{'|'.join(map(re.escape, _TOP_MODULES))}"
)
_SUFFIX = re.compile(
    r"(.+?)\.(lora_A(?:\.default)?\.weight|lora_B(?:\.default)?\.weight|lora_down\.weight|lora_up\.weight"
    r"|lora_B(?:\.default)?\.bias|alpha|diff|diff_b)"
)
_ROLE = {
    "lora_A.weight": "down",
    "lora_down.weight": "down",
    "lora_B.weight": "up",
    "lora_up.weight": "up",
    "lora_B.bias": "diff_bias",  # diffusers' name for a bias delta
    "diff_b": "diff_bias",
    "diff": "diff",
    "alpha": "alpha",
}
LAYOUTS = ("peft", "kohya", "comfyui", "diffusers")


@dataclass
class LoraLayer:
    down: torch.Tensor | None = None  # A: [rank, in, *kernel]
    up: torch.Tensor | None = None  # B: [out, rank, *1]
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank: the factor of B @ A (1 when no alpha was given)."""
        return 1.0 if self.alpha is None or not self.rank else self.alpha / self.rank


@dataclass
class Lora:
    layers: dict[str, LoraLayer]
    source: str = "<memory>"
    layout: str = "comfyui"
    metadata: dict[str, str] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)

    @classmethod
    def from_pairs(
        cls, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor, float | None]], source: str = "<memory>"
    ) -> Lora:
        """From {Wan module name: (A [rank, in], B [out, rank], alpha)}."""
        return cls(
            {name: LoraLayer(down=a, up=b, alpha=alpha) for name, (a, b, alpha) in pairs.items()}, source
        )


# ----------------------------------------------------------------------------------------- load
def load_lora(
    path: str | Path,
    *,
    section: str | None = None,
    adapter_config: str | Path | Mapping | None = None,
    strict: bool = True,
) -> Lora:
    """Read a LoRA file in any supported layout. ``section`` picks a nested dict of a pickle
    (default ``generator_lora`` when present, as in LongLive's ``lora.pt``). ``adapter_config`` gives
    peft's alpha settings (default: ``adapter_config.json`` next to a peft ``adapter_model.*``)."""
    path = Path(path)
    tree, meta = read_tensor_file(path)
    flat = _select(tree, path, section)
    config = _adapter_config(path, adapter_config, meta)
    lora = lora_from_state_dict(flat, source=str(path), adapter_config=config, strict=strict)
    lora.metadata = meta
    return lora


def _select(tree: TensorTree, path: Path, section: str | None) -> dict[str, LazyTensor]:
    node = tree
    if section is None and not any(isinstance(v, LazyTensor) for v in tree.values()):
        section = "generator_lora" if isinstance(tree.get("generator_lora"), Mapping) else None
        if section is None:
            subs = [k for k, v in tree.items() if isinstance(v, Mapping)]
            if len(subs) != 1:
                raise LoraError(
                    f"{path}: no LoRA tensors at the top level; nested sections: {subs} (pass section=)"
                )
            section = subs[0]
    if section is not None:
        for part in section.split("/"):
            if not isinstance(node.get(part), Mapping):
                raise LoraError(f"{path}: has no section {section!r}")
            node = node[part]
    bad = [k for k, v in node.items() if not isinstance(v, LazyTensor)]
    if bad:
        raise LoraError(f"{path}: entries that are not tensors: {bad[:10]}")
    return dict(node)


def _adapter_config(path: Path, given: str | Path | Mapping | None, meta: Mapping[str, str]) -> dict:
    if isinstance(given, Mapping):
        return dict(given)
    if given is not None:
        return json.loads(Path(given).read_text())
    side = path.parent / "adapter_config.json"
    if path.stem == "adapter_model" and side.is_file():
        return json.loads(side.read_text())
    if "lora_adapter_metadata" in meta:  # diffusers: {"transformer.lora_alpha": ..., ...}
        raw = json.loads(meta["lora_adapter_metadata"])
        return {k.removeprefix("transformer."): v for k, v in raw.items()}
    return {}


def detect_layout(keys) -> str:
    keys = [_unwrap(k) for k in keys]
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith("transformer.") or ".attn1." in k or ".attn2." in k for k in keys):
        return "diffusers"
    return "comfyui"


def _unwrap(key: str) -> str:
    for tok in WRAPPER_TOKENS:
        key = key.replace(tok, "")
    return key


def _module_name(name: str, layout: str) -> str | None:
    """Wan module name of a layout's module name, or None."""
    if layout == "kohya":
        rest = name.removeprefix("lora_unet_").lstrip("_")
        m = re.fullmatch(r"blocks_(\d+)_(.+)", rest)
        wan = f"blocks.{m[1]}.{_KOHYA_BLOCK[m[2]]}" if m and m[2] in _KOHYA_BLOCK else _KOHYA_TOP.get(rest)
        return wan
    name = name.removeprefix("base_model.model.").removeprefix("transformer.")
    for pre in ("model.diffusion_model.", "diffusion_model.", "model."):
        if name.startswith(pre):
            name = name[len(pre) :]
            break
    if _WAN_MODULE.fullmatch(name):
        return name
    wan = diffusers_to_wan(name)
    return wan if wan is not None and _WAN_MODULE.fullmatch(wan) else None


def lora_from_state_dict(
    sd: Mapping[str, LazyTensor | torch.Tensor],
    *,
    source: str = "<memory>",
    adapter_config: Mapping | None = None,
    strict: bool = True,
) -> Lora:
    """The internal form of a LoRA state dict in any supported layout."""
    layout = detect_layout(sd.keys())
    layers: dict[str, LoraLayer] = {}
    origin: dict[tuple[str, str], str] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        m = _SUFFIX.fullmatch(_unwrap(key))
        wan = _module_name(m[1], layout) if m else None
        if wan is None:
            unknown.append(key)
            continue
        role = _ROLE[m[2].replace(".default", "")]
        if (wan, role) in origin:
            raise LoraError(f"{source}: keys {origin[(wan, role)]!r} and {key!r} both give {role} of {wan!r}")
        origin[(wan, role)] = key
        t = value.load() if isinstance(value, LazyTensor) else value
        layer = layers.setdefault(wan, LoraLayer())
        if role == "alpha":
            if t.numel() != 1:
                raise LoraError(f"{source}: key {key!r}: alpha must be one number, got shape {list(t.shape)}")
            layer.alpha = float(t.float().item())
        else:
            setattr(layer, role, t)
    if unknown and strict:
        raise LoraError(
            f"{source}: {len(unknown)} keys are not LoRA weights of a Wan2.1 DiT module ({layout} layout "
            f"assumed): {unknown[:12]}{' ...' if len(unknown) > 12 else ''}"
        )
    for wan, layer in layers.items():
        if (layer.down is None) != (layer.up is None):
            have = "lora_A/down" if layer.down is not None else "lora_B/up"
            raise LoraError(f"{source}: module {wan!r} has {have} but not its pair")
        if layer.down is not None and layer.up.shape[1] != layer.down.shape[0]:
            raise LoraError(
                f"{source}: module {wan!r}: lora_B/up {list(layer.up.shape)} and lora_A/down "
                f"{list(layer.down.shape)} disagree on the rank"
            )
        if layer.alpha is not None and layer.down is None:
            raise LoraError(f"{source}: module {wan!r} has an alpha but no lora_A/lora_B weights")
    if adapter_config:
        _apply_peft_alpha(layers, adapter_config)
    return Lora(layers, source, layout, unknown_keys=unknown)


def _apply_peft_alpha(layers: dict[str, LoraLayer], cfg: Mapping) -> None:
    """peft semantics: scale = lora_alpha / r (or / sqrt(r) with use_rslora); alpha_pattern overrides."""
    default = cfg.get("lora_alpha")
    patterns = cfg.get("alpha_pattern") or {}
    for name, layer in layers.items():
        if layer.down is None or layer.alpha is not None:
            continue
        alpha = next((a for p, a in patterns.items() if re.fullmatch(rf"(.*\.)?(?:{p})", name)), default)
        if alpha is None:
            continue
        if cfg.get("use_rslora"):
            alpha = alpha * math.sqrt(layer.rank)  # so that alpha / rank = lora_alpha / sqrt(rank)
        layer.alpha = float(alpha)


# ----------------------------------------------------------------------------------------- deltas
def lora_param_deltas(
    lora: Lora, shapes: Mapping[str, tuple[int, ...] | torch.Size]
) -> dict[str, Callable[..., torch.Tensor]]:
    """{parameter name: delta(device=None) -> float32 tensor of that parameter's shape} for a model
    whose parameters have ``shapes``. Everything is checked before anything is computed."""
    parts: dict[str, list[Callable[..., torch.Tensor]]] = {}

    def target(name: str, what: str, *cands: str) -> tuple[str, tuple[int, ...]]:
        for c in cands:
            if c in shapes:
                return c, tuple(shapes[c])
        raise LoraError(f"{lora.source}: {what} of {name!r} has no parameter {cands[0]!r} in the model")

    def check(cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise LoraError(f"{lora.source}: module {name!r}: {msg}")

    for name, layer in lora.layers.items():
        if layer.down is not None:
            pname, w = target(name, "lora_A/lora_B", f"{name}.weight")
            a, b = layer.down, layer.up
            out, inp = w[0], math.prod(w[1:])
            check(
                b.shape[0] == out and a.numel() == layer.rank * inp and b.numel() == out * layer.rank,
                name,
                f"lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the weight {list(w)}",
            )
            parts.setdefault(pname, []).append(
                lambda device=None, a=a, b=b, w=w, s=layer.scale: (
                    s
                    * (
                        b.to(device, torch.float32).reshape(b.shape[0], -1)
                        @ a.to(device, torch.float32).reshape(a.shape[0], -1)
                    )
                ).reshape(w)
            )
        if layer.diff is not None:
            pname, w = target(name, "diff", f"{name}.weight", name)
            check(tuple(layer.diff.shape) == w, name, f"diff {list(layer.diff.shape)} does not fit {list(w)}")
            parts.setdefault(pname, []).append(lambda device=None, d=layer.diff: d.to(device, torch.float32))
        if layer.diff_bias is not None:
            pname, w = target(name, "diff_b", f"{name}.bias")
            check(
                tuple(layer.diff_bias.shape) == w,
                name,
                f"diff_b {list(layer.diff_bias.shape)} does not fit {list(w)}",
            )
            parts.setdefault(pname, []).append(
                lambda device=None, d=layer.diff_bias: d.to(device, torch.float32)
            )

    def total(fns: list[Callable[..., torch.Tensor]]) -> Callable[..., torch.Tensor]:
        def delta(device=None) -> torch.Tensor:
            out = fns[0](device)
            for f in fns[1:]:
                out = out + f(device)
            return out

        return delta

    return {p: total(fns) for p, fns in parts.items()}


def _updated(p: torch.Tensor, delta: Callable[..., torch.Tensor], strength: float) -> torch.Tensor:
    return (p.detach().to(torch.float32) + strength * delta(p.device)).to(p.dtype)


# ----------------------------------------------------------------------------------------- apply
@dataclass
class AppliedLora:
    """A LoRA applied at runtime: the original tensors it replaced, for ``remove_lora``."""

    lora: Lora
    strength: float
    originals: dict[str, torch.Tensor]


def _stack(model: nn.Module) -> list[AppliedLora]:
    if "_rf_loras" not in model.__dict__:
        model.__dict__["_rf_loras"] = []
    return model.__dict__["_rf_loras"]


@torch.no_grad()
def apply_lora(model: nn.Module, lora: Lora, strength: float = 1.0) -> AppliedLora:
    """Add ``strength * alpha/rank * B @ A`` (and any diffs) to the model's weights, removably.
    Several LoRAs stack; ``remove_lora`` undoes them exactly, in any order."""
    handle = AppliedLora(lora, strength, {})
    _swap_in(model, handle)
    return handle


def _swap_in(model: nn.Module, handle: AppliedLora) -> None:
    params = dict(model.named_parameters())
    deltas = lora_param_deltas(handle.lora, {k: p.shape for k, p in params.items()})
    new = {name: _updated(params[name], d, handle.strength) for name, d in deltas.items()}
    handle.originals = {name: params[name].data for name in new}
    for name, t in new.items():
        params[name].data = t
    _stack(model).append(handle)


@torch.no_grad()
def remove_lora(model: nn.Module, handle: AppliedLora | None = None) -> None:
    """Remove one applied LoRA (``handle``) or all of them, restoring the original tensors."""
    stack = _stack(model)
    if handle is not None and not any(h is handle for h in stack):
        raise LoraError("this LoRA is not applied to this model")
    params = dict(model.named_parameters())
    later: list[AppliedLora] = []
    while stack:
        h = stack.pop()
        for name, orig in h.originals.items():
            params[name].data = orig
        if h is handle:
            break
        if handle is not None:
            later.append(h)
    for h in reversed(later):  # LoRAs applied after the removed one go back on top, same handles
        _swap_in(model, h)


def applied_loras(model: nn.Module) -> list[AppliedLora]:
    return list(_stack(model))


@torch.no_grad()
def merge_lora_into(params: Mapping[str, torch.Tensor], lora: Lora, strength: float = 1.0) -> None:
    """Bake a LoRA into tensors in place (a state dict or ``dict(model.named_parameters())``)."""
    deltas = lora_param_deltas(lora, {k: p.shape for k, p in params.items()})
    for name, d in deltas.items():
        params[name].copy_(_updated(params[name], d, strength))


def merge_lora(model: nn.Module, lora: Lora, strength: float = 1.0) -> None:
    """Bake a LoRA into the model's weights (no extra memory, not removable)."""
    if _stack(model):
        raise LoraError("remove the runtime LoRAs (remove_lora) before merging another into the weights")
    merge_lora_into(dict(model.named_parameters()), lora, strength)


# ----------------------------------------------------------------------------------------- save
def save_lora(
    path: str | Path,
    lora: Lora | Mapping[str, tuple[torch.Tensor, torch.Tensor, float | None]],
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a LoRA as safetensors in the canonical layout: ``diffusion_model.<module>.lora_A.weight``,
    ``.lora_B.weight``, ``.alpha`` (always written; rank when none was given), ``.diff``, ``.diff_b``.
    ``lora`` may also be {Wan module name: (A, B, alpha)} (what training produces)."""
    if not isinstance(lora, Lora):
        lora = Lora.from_pairs(lora)
    out: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu")
        out[key] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()

    ranks = {}
    for name, layer in sorted(lora.layers.items()):
        pre = f"diffusion_model.{name}"
        if layer.down is not None:
            put(f"{pre}.lora_A.weight", layer.down)
            put(f"{pre}.lora_B.weight", layer.up)
            out[f"{pre}.alpha"] = torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))
            ranks[name] = layer.rank
        if layer.diff is not None:
            put(f"{pre}.diff", layer.diff)
        if layer.diff_bias is not None:
            put(f"{pre}.diff_b", layer.diff_bias)
    meta = {
        "format": "pt",
        "rf_kind": "lora",
        "rf_lora_layout": "comfyui",
        "rf_lora_ranks": json.dumps(sorted(set(ranks.values()))),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    save_tensors(path, out, meta)
