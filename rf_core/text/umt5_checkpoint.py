"""Load a umT5 encoder from the files people actually have.

Two naming schemes are accepted:

* Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (a pickled state dict; also the same names in
  safetensors files such as kijai's ``umt5-xxl-enc-*.safetensors``): ``token_embedding.weight``,
  ``blocks.{i}.attn.q.weight``, ... — our module's own names.
* ComfyUI / Hugging Face T5 names (``umt5_xxl_fp16.safetensors``, ``umt5_xxl_fp8_e4m3fn_scaled``):
  ``shared.weight``, ``encoder.block.{i}.layer.0.SelfAttention.q.weight``, ...; mapped to ours.

float8 weights are dequantised on load: ``weight.float() * scale`` where the scale is the optional
``<layer>.scale_weight`` (ComfyUI "scaled_fp8" files) or ``<layer>.weight_scale`` (newer
``comfy_quant`` files) tensor, a scalar or one value per output row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rf_core.text.umt5 import UMT5Config, UMT5Encoder

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Keys that carry no encoder weight: quantisation bookkeeping, the embedded SentencePiece model,
# and the decoder half of full encoder-decoder files.
_IGNORED_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
_IGNORED_NAMES = ("scaled_fp8", "spiece_model")
_IGNORED_PREFIXES = ("decoder.", "lm_head.")

_COMFY_BLOCK_NAMES = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # the GELU branch
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",  # the linear branch
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
_COMFY_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_WAN_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


class UMT5CheckpointError(ValueError):
    """A text-encoder file that cannot be used; the message names the file and the key."""


@dataclass
class _TensorFile:
    """Lazy access to a checkpoint's tensors by name."""

    path: Path
    keys: list[str]
    shape: Callable[[str], tuple[int, ...]]
    dtype: Callable[[str], torch.dtype]
    get: Callable[[str], torch.Tensor]


def _open_tensor_file(path: Path) -> _TensorFile:
    if not path.is_file():
        raise UMT5CheckpointError(f"text encoder file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return _open_pickle(path)
    if len(head) == 9 and head[8:9] == b"{":
        return _open_safetensors(path)
    raise UMT5CheckpointError(
        f"{path}: not a safetensors file or a torch.save checkpoint (first bytes {head!r})"
    )


def _open_safetensors(path: Path) -> _TensorFile:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # the library raises its own error types for corrupt headers
        raise UMT5CheckpointError(f"{path}: cannot read safetensors header: {err}") from err
    keys = list(handle.keys())
    infos = {}

    def info(key: str):
        if key not in infos:
            sl = handle.get_slice(key)
            infos[key] = (tuple(sl.get_shape()), _safetensors_dtype(path, key, sl.get_dtype()))
        return infos[key]

    return _TensorFile(path, keys, lambda k: info(k)[0], lambda k: info(k)[1], handle.get_tensor)


def _safetensors_dtype(path: Path, key: str, name: str) -> torch.dtype:
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I32": torch.int32,
        "I64": torch.int64,
        "BOOL": torch.bool,
    }
    if name not in table:
        raise UMT5CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {name}")
    return table[name]


def _open_pickle(path: Path) -> _TensorFile:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise UMT5CheckpointError(f"{path}: cannot load checkpoint: {err}") from err
        # Legacy (non-zip) torch.save files cannot be memory-mapped; read them whole.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UMT5CheckpointError(f"{path}: cannot load checkpoint: {err}") from err
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UMT5CheckpointError(f"{path}: expected a flat state dict of tensors, got {type(sd).__name__}")
    return _TensorFile(path, list(sd), lambda k: tuple(sd[k].shape), lambda k: sd[k].dtype, sd.__getitem__)


def _find_prefix(keys: list[str], anchor: str) -> str | None:
    for key in keys:
        if key == anchor or key.endswith("." + anchor):
            return key[: len(key) - len(anchor)]
    return None


def _is_ignored(name: str) -> bool:
    return name in _IGNORED_NAMES or name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES)


def _map_names(tf: _TensorFile) -> dict[str, str]:
    """Our key -> the file's key. Raises on an unknown layout or a key we cannot place."""
    keys = tf.keys
    comfy_prefix = _find_prefix(keys, "encoder.final_layer_norm.weight")
    wan_prefix = None if comfy_prefix is not None else _find_prefix(keys, "token_embedding.weight")
    if comfy_prefix is None and wan_prefix is None:
        raise UMT5CheckpointError(
            f"{tf.path}: not a umT5 encoder checkpoint: found neither 'encoder.final_layer_norm.weight' "
            f"(ComfyUI/Hugging Face names) nor 'token_embedding.weight' (Wan names); first keys: {keys[:5]}"
        )
    prefix = comfy_prefix if comfy_prefix is not None else wan_prefix
    ours: dict[str, str] = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if _is_ignored(name):
            continue
        target = _comfy_to_ours(name) if comfy_prefix is not None else name
        if target is None:
            raise UMT5CheckpointError(f"{tf.path}: unexpected key {key!r} in a umT5 encoder checkpoint")
        # Hugging Face files hold the embedding twice (shared + encoder.embed_tokens, tied); keep one.
        if target in ours and target == "token_embedding.weight":
            continue
        ours[target] = key
    return ours


def _comfy_to_ours(name: str) -> str | None:
    if name in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if name == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = _COMFY_BLOCK_KEY.fullmatch(name)
    if m and m.group(2) in _COMFY_BLOCK_NAMES:
        return f"blocks.{m.group(1)}.{_COMFY_BLOCK_NAMES[m.group(2)]}"
    return None


def _infer_config(tf: _TensorFile, names: dict[str, str], base: UMT5Config) -> UMT5Config:
    def shape(our_key: str) -> tuple[int, ...]:
        if our_key not in names:
            raise UMT5CheckpointError(f"{tf.path}: missing key {our_key!r} (needed to size the model)")
        return tf.shape(names[our_key])

    layers = sorted({int(m.group(1)) for k in names if (m := _WAN_BLOCK_KEY.match(k))})
    if not layers:
        raise UMT5CheckpointError(f"{tf.path}: no encoder blocks found")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise UMT5CheckpointError(f"{tf.path}: encoder blocks {missing} are missing (found {len(layers)})")
    vocab, dim = shape("token_embedding.weight")
    buckets, heads = shape("blocks.0.pos_embedding.embedding.weight")
    found = dict(
        vocab_size=vocab,
        dim=dim,
        dim_attn=shape("blocks.0.attn.q.weight")[0],
        dim_ffn=shape("blocks.0.ffn.fc1.weight")[0],
        num_heads=heads,
        num_layers=len(layers),
        num_buckets=buckets,
    )
    return UMT5Config(**{f.name: found.get(f.name, getattr(base, f.name)) for f in fields(UMT5Config)})


def _check_config(path: Path, found: UMT5Config, expected: UMT5Config) -> None:
    for f in fields(UMT5Config):
        got, want = getattr(found, f.name), getattr(expected, f.name)
        if got != want:
            raise UMT5CheckpointError(f"{path}: encoder {f.name} is {got} in the file, expected {want}")


def _read_weight(tf: _TensorFile, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = tf.get(key)
    if t.dtype in _FP8:
        t = t.to(torch.float32)
        base = key[: -len(".weight")] if key.endswith(".weight") else key
        for suffix in _SCALE_SUFFIXES:
            if base + suffix in tf.keys:
                t = t * _scale_for(tf, base + suffix, tuple(t.shape))
                break
    elif t.dtype not in _FLOAT:
        raise UMT5CheckpointError(f"{tf.path}: tensor {key!r} has dtype {t.dtype}, expected a float type")
    return t.to(device=device, dtype=dtype)


def _scale_for(tf: _TensorFile, key: str, weight_shape: tuple[int, ...]) -> torch.Tensor:
    scale = tf.get(key).to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if len(weight_shape) == 2 and scale.numel() == weight_shape[0]:
        return scale.reshape(-1, 1)
    raise UMT5CheckpointError(
        f"{tf.path}: scale {key!r} has shape {list(scale.shape)}; only a scalar or one value per output "
        f"row of the weight {list(weight_shape)} is supported (block-wise quantisation is not)"
    )


def _default_dtype(tf: _TensorFile, names: dict[str, str]) -> torch.dtype:
    dt = tf.dtype(names["blocks.0.attn.q.weight"])
    return torch.bfloat16 if dt in _FP8 else dt


def load_umt5(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: UMT5Config | None = None,
) -> UMT5Encoder:
    """Build a :class:`UMT5Encoder` from a Wan ``.pth`` or a ComfyUI/HF/kijai ``.safetensors`` file.

    The model is sized from the file (pass ``config`` to insist on a size, e.g. ``UMT5_XXL``), built
    on the meta device and its parameters assigned from the file, one tensor at a time, cast to
    ``dtype`` (default: the file's dtype; bfloat16 for float8 files) and moved to ``device``
    (default CPU). Returned in eval mode without gradients.
    """
    path = Path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    tf = _open_tensor_file(path)
    names = _map_names(tf)
    found = _infer_config(tf, names, config or UMT5Config())
    if config is not None:
        _check_config(path, found, config)
    with torch.device("meta"):
        model = UMT5Encoder(found)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in names]
    if missing:
        raise UMT5CheckpointError(f"{path}: missing {len(missing)} encoder key(s), first: {missing[:3]}")
    extra = [names[k] for k in names if k not in expected]
    if extra:
        raise UMT5CheckpointError(f"{path}: unexpected key(s) {extra[:3]} in a umT5 encoder checkpoint")
    for key, want in expected.items():
        got = tf.shape(names[key])
        if got != want:
            source = f" (file key {names[key]!r})" if names[key] != key else ""
            raise UMT5CheckpointError(
                f"{path}: tensor {key!r}{source} has shape {list(got)}, expected {list(want)}"
            )
    dtype = dtype or _default_dtype(tf, names)
    state = {key: _read_weight(tf, names[key], dtype, device) for key in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
