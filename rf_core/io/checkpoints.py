"""Load a Wan2.1 DiT (student, teacher or critic) from any supported checkpoint layout.

    model = load_dit("rewardforcing.pt", device="cuda", dtype=torch.bfloat16)
    sd, cfg, info = load_dit_state_dict("Wan2.1-T2V-14B/")          # sharded, with config.json

The model is built on the meta device and the file's tensors are assigned into it one by one
(converted to the target device/dtype as they are read), so the weights exist once. The file is
checked completely before any data is read: unknown layout, missing or unexpected keys, wrong shapes,
a preset or config.json that disagrees with the weights, truncation — each an error naming the file
and the key. Layouts and detection: ``rf_core.io.formats`` and docs/formats.md.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from rf_core.config import PRESETS, DiTConfig, get_preset
from rf_core.io.formats import (
    FP8_DTYPES,
    Canonical,
    apply_config_json,
    canonicalize,
    check_against,
    dequantize,
    detect_format,
    infer_config,
    normalize_format,
    read_config_json,
    select_section,
)
from rf_core.io.safe_load import (
    CheckpointError,
    LazyTensor,
    check_shapes,
    read_tensor_file,
    write_safetensors,
)
from rf_core.lora import Lora, load_lora, lora_param_deltas, merge_lora_into
from rf_core.model.dit import WanDiT

PathLike = str | Path
# A LoRA to merge while loading: a file, a loaded Lora, or either with a strength.
LoraSpec = PathLike | Lora | tuple[PathLike | Lora, float]
_INDEX_SUFFIX = ".index.json"
_WAN_FILE = "diffusion_pytorch_model.safetensors"
_MAX_LISTED = 12


@dataclass
class LoadInfo:
    """What was loaded and how (shown to users, written into converted files' metadata)."""

    format: str
    paths: list[str]
    section: str | None = None
    config_source: str = "shapes"
    file_dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> number of tensors
    quantization: str | None = None
    ignored_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    loras: list[str] = field(default_factory=list)


@dataclass
class DitCheckpoint:
    """A checked checkpoint whose tensors are still in the file (``tensor(key)`` reads one)."""

    config: DiTConfig
    canonical: Canonical
    info: LoadInfo

    @property
    def keys(self) -> list[str]:
        return list(self.canonical.weights)

    @cached_property
    def file_dtype(self) -> torch.dtype:
        """The file's dominant float dtype by element count (float8 counts as bfloat16)."""
        count: Counter = Counter()
        for t in self.canonical.weights.values():
            if t.dtype.is_floating_point:
                count[torch.bfloat16 if t.dtype in FP8_DTYPES else t.dtype] += t.numel
        return count.most_common(1)[0][0]

    def tensor(
        self, key: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One weight, dequantised if it is float8, on ``device`` in ``dtype``."""
        scale = self.canonical.scales.get(key)
        return dequantize(self.canonical.weights[key], scale, device, dtype or self.file_dtype)


@dataclass
class Sources:
    files: list[Path]
    config_json: Path | None = None  # found next to the files: skipped if it is not a Wan config
    weight_map: dict[str, str] | None = None  # key -> shard file name, from an index
    config_given: bool = False  # config_json named by the caller: must be a readable Wan config

    @property
    def name(self) -> str:
        return (
            str(self.files[0])
            if len(self.files) == 1
            else f"{self.files[0].parent} ({len(self.files)} shards)"
        )


def resolve_paths(path_or_paths: PathLike | Sequence[PathLike]) -> Sources:
    """Checkpoint files (+ config.json and shard index) of a file, a folder, an index or a list."""
    if isinstance(path_or_paths, (list, tuple)):
        files = [Path(p) for p in path_or_paths]
        if not files:
            raise CheckpointError("no checkpoint files given")
        for p in files:
            if not p.is_file():
                raise CheckpointError(f"{p}: no such file")
        return Sources(files, _config_next_to(files[0]))
    path = Path(path_or_paths)
    if path.is_dir():
        for cand in (path / (_WAN_FILE + _INDEX_SUFFIX), path / _WAN_FILE, path / "transformer"):
            if cand.exists():
                return resolve_paths(cand)
        found = sorted(
            p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
        )
        raise CheckpointError(
            f"{path}: folder has no {_WAN_FILE}[{_INDEX_SUFFIX}]; pass one of its files instead: {found or 'none found'}"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(_INDEX_SUFFIX):
        try:
            weight_map = dict(json.loads(path.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid shard index ({e!r})") from e
        shards = [path.parent / name for name in dict.fromkeys(weight_map.values())]
        for s in shards:
            if not s.is_file():
                raise CheckpointError(f"{path}: shard {s.name} is listed but missing from {path.parent}")
        return Sources(shards, _config_next_to(path), weight_map)
    return Sources([path], _config_next_to(path))


def _config_next_to(path: Path) -> Path | None:
    cfg = path.parent / "config.json"
    return cfg if cfg.is_file() else None


def open_dit_checkpoint(
    path_or_paths: PathLike | Sequence[PathLike],
    *,
    format: str = "auto",
    prefer_ema: bool = True,
    section: str | None = None,
    preset: str | DiTConfig | None = None,
    config_json: PathLike | None = None,
) -> DitCheckpoint:
    """Open and fully check a DiT checkpoint without reading its tensor data."""
    src = resolve_paths(path_or_paths)
    if config_json is not None:
        src.config_json, src.config_given = Path(config_json), True
    flat: dict[str, LazyTensor] = {}
    chosen: str | None = None
    metadata: dict[str, str] = {}
    for p in src.files:
        tree, meta = read_tensor_file(p)
        metadata.update(meta)
        part, chosen = select_section(tree, str(p), prefer_ema, section)
        for k, t in part.items():
            if k in flat:
                raise CheckpointError(f"{p}: key {k!r} is also in {flat[k].origin.split(': ')[0]}")
            if src.weight_map is not None and src.weight_map.get(k) != p.name:
                raise CheckpointError(f"{p}: key {k!r} is not listed for this shard in the index")
            flat[k] = t
    if src.weight_map is not None and (lost := sorted(set(src.weight_map) - set(flat))):
        raise CheckpointError(f"{src.name}: keys listed in the index but in no shard: {lost[:_MAX_LISTED]}")
    info = LoadInfo(format=format, paths=[str(p) for p in src.files], section=chosen, metadata=metadata)
    return _checked(flat, info, src.name, preset, src.config_json, src.config_given)


def checkpoint_from_state_dict(
    state_dict: Mapping[str, object],
    *,
    format: str = "auto",
    prefer_ema: bool = True,
    section: str | None = None,
    preset: str | DiTConfig | None = None,
    source: str = "<state dict>",
) -> DitCheckpoint:
    """``open_dit_checkpoint`` for a (possibly nested) state dict already in memory, e.g. a training
    checkpoint or meta tensors."""
    tree = _lazy_tree(state_dict, source)
    flat, chosen = select_section(tree, source, prefer_ema, section)
    return _checked(flat, LoadInfo(format=format, paths=[], section=chosen), source, preset)


def _lazy_tree(obj: Mapping[str, object], source: str) -> dict[str, object]:
    return {
        k: LazyTensor.of(v, f"{source}: {k}")
        if isinstance(v, torch.Tensor)
        else _lazy_tree(v, source)
        if isinstance(v, Mapping)
        else v
        for k, v in obj.items()
    }


def _checked(
    flat: dict[str, LazyTensor],
    info: LoadInfo,
    source: str,
    preset: str | DiTConfig | None,
    cfg_path: Path | None = None,
    cfg_given: bool = False,
) -> DitCheckpoint:
    fmt = normalize_format(info.format)
    if not flat:
        raise CheckpointError(f"{source}: contains no tensors")
    if fmt == "auto":
        fmt = detect_format(flat.keys(), source, nested=info.section is not None)
    canon = canonicalize(flat, fmt, source)
    cfg = infer_config({k: t.shape for k, t in canon.weights.items()}, source)
    info.format = fmt
    info.file_dtypes = dict(Counter(str(t.dtype).removeprefix("torch.") for t in flat.values()))
    info.quantization = canon.quantization
    info.ignored_keys = canon.ignored
    info.config_source = next((f"shapes (preset {n})" for n, c in PRESETS.items() if c == cfg), "shapes")
    values = read_config_json(cfg_path, strict=cfg_given) if cfg_path is not None else None
    if values is not None:
        cfg = apply_config_json(cfg, values, cfg_path, source)
        info.config_source = str(cfg_path)
    elif "rf_config" in info.metadata:  # our own converted files carry their config
        cfg = apply_config_json(
            cfg, json.loads(info.metadata["rf_config"]), Path(f"{source} metadata"), source
        )
        info.config_source = "file metadata"
    if preset is not None:
        wanted = get_preset(preset) if isinstance(preset, str) else preset
        check_against(
            cfg, wanted, f"preset {preset!r}" if isinstance(preset, str) else "the requested config", source
        )
        cfg = wanted
        info.config_source = f"preset {preset}" if isinstance(preset, str) else "given config"
    _check_keys(canon, cfg, fmt, source)
    return DitCheckpoint(cfg, canon, info)


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Wan key -> shape of a ``WanDiT`` with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(canon: Canonical, cfg: DiTConfig, fmt: str, source: str) -> None:
    check_shapes(
        expected_shapes(cfg),
        canon.weights,
        f"{source} (layout {fmt!r}, model {cfg.num_layers} blocks x {cfg.dim})",
        "the Wan2.1 DiT",
        file_keys={k: t.origin.split(": ", 1)[-1] for k, t in canon.weights.items()},
    )
    for t in canon.weights.values():
        if not t.dtype.is_floating_point:
            raise CheckpointError(f"{t.origin}: dtype {t.dtype} is not a floating-point weight")


def load_dit_state_dict(
    path_or_paths: PathLike | Sequence[PathLike],
    *,
    format: str = "auto",
    prefer_ema: bool = True,
    section: str | None = None,
    preset: str | DiTConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    loras: Sequence[LoraSpec] = (),
    config_json: PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], DiTConfig, LoadInfo]:
    """(Wan-named state dict, config, info) of a checkpoint in any supported layout.

    ``dtype`` None keeps the file's dominant float dtype (float8 files become bfloat16, dequantised).
    ``loras`` are merged into the weights (see ``rf_core.lora``).
    """
    ckpt = open_dit_checkpoint(
        path_or_paths,
        format=format,
        prefer_ema=prefer_ema,
        section=section,
        preset=preset,
        config_json=config_json,
    )
    dtype = dtype or ckpt.file_dtype
    sd = {k: ckpt.tensor(k, device, dtype) for k in ckpt.keys}
    _merge_loras(sd, loras, ckpt.info)
    return sd, ckpt.config, ckpt.info


def load_dit(
    path: PathLike | Sequence[PathLike],
    *,
    preset: str | DiTConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    format: str = "auto",
    prefer_ema: bool = True,
    section: str | None = None,
    attn_backend: str = "auto",
    loras: Sequence[LoraSpec] = (),
    config_json: PathLike | None = None,
) -> WanDiT:
    """A ready ``WanDiT`` (eval mode, no grad) from any supported checkpoint; ``model.load_info``
    tells what was loaded. Built on the meta device, weights assigned as read: one copy in memory."""
    ckpt = open_dit_checkpoint(
        path, format=format, prefer_ema=prefer_ema, section=section, preset=preset, config_json=config_json
    )
    dtype = dtype or ckpt.file_dtype
    with torch.device("meta"):
        model = WanDiT(ckpt.config, attn_backend=attn_backend)
    sd = {k: ckpt.tensor(k, device, dtype) for k in ckpt.keys}
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    _merge_loras(dict(model.named_parameters()), loras, ckpt.info)
    model.load_info = ckpt.info
    return model.eval().requires_grad_(False)


def _resolve_loras(loras: Sequence[LoraSpec]) -> list[tuple[Lora, float]]:
    out = []
    for spec in loras:
        item, strength = spec if isinstance(spec, tuple) else (spec, 1.0)
        out.append((item if isinstance(item, Lora) else load_lora(item), float(strength)))
    return out


def _merge_loras(params: Mapping[str, torch.Tensor], loras: Sequence[LoraSpec], info: LoadInfo) -> None:
    for lora, strength in _resolve_loras(loras):
        with torch.no_grad():
            merge_lora_into(params, lora, strength)
        info.loras.append(f"{lora.source} x {strength}")


def save_dit(
    path: PathLike,
    ckpt: DitCheckpoint,
    *,
    dtype: torch.dtype | None = None,
    loras: Sequence[LoraSpec] = (),
    extra_metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write ``ckpt`` as a canonical safetensors file: Wan key names, one dtype, fp8 dequantised,
    LoRAs merged, metadata with the source layout and the config. Tensor by tensor, atomically;
    overwrite=False never replaces a file another run made meanwhile (``write_safetensors``)."""
    dtype = dtype or ckpt.file_dtype
    shapes = {k: t.shape for k, t in ckpt.canonical.weights.items()}
    deltas: dict[str, list] = {}
    for lora, strength in _resolve_loras(loras):
        for name, delta in lora_param_deltas(lora, shapes).items():
            deltas.setdefault(name, []).append((delta, strength))
        ckpt.info.loras.append(f"{lora.source} x {strength}")

    def produce(key: str) -> torch.Tensor:
        if key not in deltas:
            return ckpt.tensor(key, "cpu", dtype)
        t = ckpt.tensor(key, "cpu", torch.float32)
        for delta, strength in deltas[key]:
            t = t + strength * delta()
        return t.to(dtype)

    info = ckpt.info
    metadata = {
        "format": "pt",
        "rf_kind": "wan-dit",
        "rf_config": json.dumps(ckpt.config.to_dict()),
        "rf_source_format": info.format,
        "rf_source_files": json.dumps([Path(p).name for p in info.paths]),
        "rf_source_section": info.section or "",
        "rf_source_quantization": info.quantization or "",
        "rf_loras": json.dumps(info.loras),
        **dict(extra_metadata or {}),
    }
    write_safetensors(path, {k: (s, dtype) for k, s in shapes.items()}, produce, metadata, overwrite)
