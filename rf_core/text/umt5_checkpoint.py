"""Load a umT5 encoder from the files people actually have.

Two naming schemes are accepted:

* Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (a pickled state dict; also the same names in
  safetensors files such as kijai's ``umt5-xxl-enc-*.safetensors``): ``token_embedding.weight``,
  ``blocks.{i}.attn.q.weight``, ... — our module's own names.
* ComfyUI / Hugging Face T5 names (``umt5_xxl_fp16.safetensors``, ``umt5_xxl_fp8_e4m3fn_scaled``):
  ``shared.weight``, ``encoder.block.{i}.layer.0.SelfAttention.q.weight``, ...; mapped to ours.

float8 weights are dequantised on load: ``weight.float() * scale`` where the scale is the optional
``<layer>.scale_weight`` (ComfyUI "scaled_fp8" files) or ``<layer>.weight_scale`` (newer
``comfy_quant`` files) tensor, a scalar or one value per output row. File reading, fp8 handling and
the key/shape check are the DiT loader's (``rf_core.io.safe_load``, ``rf_core.io.formats``); errors
are ``rf_core.io.safe_load.CheckpointError``.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import torch

from rf_core.io.formats import (
    FP8_BOOKKEEPING_SUFFIXES,
    FP8_DTYPES,
    SCALED_FP8_MARKER,
    check_fp8_scale,
    dequantize,
    scale_key_of,
)
from rf_core.io.safe_load import (
    CheckpointError,
    LazyTensor,
    assign_state_dict,
    check_module_keys,
    read_flat_state_dict,
)
from rf_core.text.umt5 import UMT5Config, UMT5Encoder

# Keys that carry no encoder weight: quantisation bookkeeping, the embedded SentencePiece model,
# and the decoder half of full encoder-decoder files.
_IGNORED_NAMES = (SCALED_FP8_MARKER, "spiece_model")
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


def _find_prefix(keys: list[str], anchor: str) -> str | None:
    for key in keys:
        if key == anchor or key.endswith("." + anchor):
            return key[: len(key) - len(anchor)]
    return None


def _is_ignored(name: str) -> bool:
    return (
        name in _IGNORED_NAMES
        or name.endswith(FP8_BOOKKEEPING_SUFFIXES)
        or name.startswith(_IGNORED_PREFIXES)
    )


def _map_names(path: Path, tensors: dict[str, LazyTensor]) -> dict[str, str]:
    """Our key -> the file's key. Raises on an unknown layout or a key we cannot place."""
    keys = list(tensors)
    comfy_prefix = _find_prefix(keys, "encoder.final_layer_norm.weight")
    wan_prefix = None if comfy_prefix is not None else _find_prefix(keys, "token_embedding.weight")
    if comfy_prefix is None and wan_prefix is None:
        raise CheckpointError(
            f"{path}: not a umT5 encoder checkpoint: found neither 'encoder.final_layer_norm.weight' "
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
            raise CheckpointError(f"{path}: unexpected key {key!r} in a umT5 encoder checkpoint")
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


def _infer_config(path: Path, weights: dict[str, LazyTensor], base: UMT5Config) -> UMT5Config:
    def shape(our_key: str) -> tuple[int, ...]:
        if our_key not in weights:
            raise CheckpointError(f"{path}: missing key {our_key!r} (needed to size the model)")
        return weights[our_key].shape

    layers = sorted({int(m.group(1)) for k in weights if (m := _WAN_BLOCK_KEY.match(k))})
    if not layers:
        raise CheckpointError(f"{path}: no encoder blocks found")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise CheckpointError(f"{path}: encoder blocks {missing} are missing (found {len(layers)})")
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
            raise CheckpointError(f"{path}: encoder {f.name} is {got} in the file, expected {want}")


def _scales(path: Path, tensors: dict[str, LazyTensor], names: dict[str, str]) -> dict[str, LazyTensor]:
    """Our key -> the (checked) fp8 scale of that weight, for the fp8 weights that have one. Weights
    that are neither fp8 nor another float type are refused."""
    scales = {}
    for ours, key in names.items():
        t = tensors[key]
        if t.dtype not in FP8_DTYPES:
            if not t.dtype.is_floating_point:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected a float type")
            continue
        scale_key = scale_key_of(key, tensors)
        if scale_key is not None:
            check_fp8_scale(tensors[scale_key], t, str(path), scale_key, key)
            scales[ours] = tensors[scale_key]
    return scales


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
    (default CPU). Everything is checked before any tensor data is read. Returned in eval mode
    without gradients.
    """
    path = Path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    tensors = read_flat_state_dict(path)
    names = _map_names(path, tensors)
    weights = {ours: tensors[key] for ours, key in names.items()}
    found = _infer_config(path, weights, config or UMT5Config())
    if config is not None:
        _check_config(path, found, config)
    with torch.device("meta"):
        model = UMT5Encoder(found)
    check_module_keys(model, weights, str(path), file_keys=names)
    scales = _scales(path, tensors, names)
    if dtype is None:
        file_dtype = weights["blocks.0.attn.q.weight"].dtype
        dtype = torch.bfloat16 if file_dtype in FP8_DTYPES else file_dtype
    state = {k: dequantize(t, scales.get(k), device, dtype) for k, t in weights.items()}
    assign_state_dict(model, state, str(path))
    return model.eval().requires_grad_(False)
