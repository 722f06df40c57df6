"""Reading and writing tensor files without running code from them and without holding them twice.

* safetensors files are read by a small reader of our own: the header is parsed and checked against
  the file size up front (a truncated download is reported before anything is loaded), then each
  tensor is read on demand with ``readinto`` into a fresh tensor. Nothing stays mapped, so the
  process never holds the file and the converted model at the same time; peak memory is the model
  plus one tensor (benchmarks/load_rss.py measures it).
* Pickled checkpoints (``.pt``/``.pth``/``.bin``/``.ckpt``) are opened with
  ``torch.load(weights_only=True, mmap=True)``: only tensors and plain containers are accepted, a
  pickle that needs any other Python object is refused, and tensor data stays in the file mapping
  until it is used.
* ``write_safetensors`` streams tensors to disk one at a time and renames the finished file into
  place, so a crash never leaves a half-written file under the final name.
* ``check_module_keys`` / ``assign_state_dict`` compare a state dict with a module built on the meta
  device and make the module's parameters *be* the loaded tensors, so the weights exist once.

Every reader returns ``LazyTensor`` entries: shape and dtype are known without reading the data.
Every loader (DiT, LoRA, VAE, TAEHV, umT5) reads through this module and raises ``CheckpointError``.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rf_core.io.partial import partial_path, publish


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message names the file and, where it applies, the key."""


@dataclass(frozen=True)
class LazyTensor:
    """A tensor in a file: shape and dtype now, data when ``load()`` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    origin: str  # "<file>: <key>", for messages
    # (device, dtype) -> tensor, for readers that convert without keeping a temporary copy around
    convert: Callable[[torch.device | str | None, torch.dtype], torch.Tensor] | None = None

    def load_as(self, device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
        """The tensor on ``device`` (None: where it is) in ``dtype``; no copy when nothing changes."""
        if self.convert is not None:
            return self.convert(device, dtype)
        return self.load().to(device=device, dtype=dtype)

    @classmethod
    def of(cls, t: torch.Tensor, origin: str) -> LazyTensor:
        return cls(tuple(t.shape), t.dtype, lambda: t, origin)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


# safetensors dtype names (https://github.com/huggingface/safetensors, format description)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# A header larger than this is not a real checkpoint header (guards against reading garbage sizes).
_MAX_HEADER = 100 * 1024 * 1024


def sniff(path: Path) -> str:
    """'safetensors', 'pickle' (torch.save zip or legacy pickle) or raise."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found (no such checkpoint file)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise CheckpointError(
            f"{path}: not a safetensors file or a torch.save checkpoint: the file is empty or truncated "
            f"({len(head)} bytes)"
        )
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    n = struct.unpack("<Q", head[:8])[0]
    if head[8:9] == b"{" and n <= _MAX_HEADER:
        return "safetensors"
    raise CheckpointError(f"{path}: not a safetensors file or a torch.save checkpoint (first bytes {head!r})")


class SafetensorsFile:
    """Header of a safetensors file, checked against the file size; tensors read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            n = struct.unpack("<Q", raw)[0]
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt safetensors file: the header claims {n} bytes "
                    f"but the file has {size} bytes in all"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.data_start = 8 + n
        self._scratch = torch.empty(0, dtype=torch.uint8)
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self.entries[key] = self._check_entry(key, info, size)

    def _check_entry(self, key: str, info, size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            name, shape, (begin, end) = (
                info["dtype"],
                tuple(int(s) for s in info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: key {key!r}: malformed header entry {info!r}") from e
        if name not in _ST_DTYPES:
            raise CheckpointError(
                f"{self.path}: key {key!r}: unsupported dtype {name} (supported: {sorted(_ST_DTYPES)})"
            )
        dtype = _ST_DTYPES[name]
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{self.path}: key {key!r}: {name}{list(shape)} needs {expected} bytes, "
                f"the header gives {end - begin}"
            )
        if self.data_start + end > size:
            raise CheckpointError(
                f"{self.path}: file is truncated: key {key!r} ends at byte {self.data_start + end} "
                f"but the file has {size} bytes"
            )
        return dtype, shape, self.data_start + begin, expected

    def read(
        self, key: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor. Read straight into its final memory when it stays on the CPU in its dtype;
        otherwise through one reused scratch buffer, so conversions leave no freed buffers behind
        (they would fragment the heap and raise peak memory by a tenth of the model)."""
        stored, shape, offset, nbytes = self.entries[key]
        dtype = dtype or stored
        as_is = dtype == stored and (device is None or torch.device(device).type == "cpu")
        if as_is:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        else:
            if self._scratch.numel() < nbytes:
                self._scratch = torch.empty(nbytes, dtype=torch.uint8)
            buf = self._scratch[:nbytes]
        with open(self.path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(buf.numpy()))
        if got != nbytes:
            raise CheckpointError(f"{self.path}: key {key!r}: file ended after {got} of {nbytes} bytes")
        t = buf.view(stored).reshape(shape)
        return t if as_is else t.to(device=device, dtype=dtype, copy=True)

    def lazy(self) -> dict[str, LazyTensor]:
        return {
            k: LazyTensor(
                shape,
                dtype,
                (lambda k=k: self.read(k)),
                f"{self.path}: {k}",
                convert=lambda device, dt, k=k: self.read(k, device, dt),
            )
            for k, (dtype, shape, _, _) in self.entries.items()
        }


def torch_load(path: str | Path) -> object:
    """``torch.load`` restricted to tensors and plain containers, memory-mapped where possible."""
    path = Path(path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # legacy (pre-zip) torch.save files cannot be mapped
    try:
        with warnings.catch_warnings():
            # a plain pickle (not from torch.save) draws a warning about its protocol before it is
            # refused below with the reason: the warning would be a second, stray line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise _refused(path, e) from e
        raise CheckpointError(f"{path}: cannot read: the file is truncated or corrupt ({_reason(e)})") from e
    except Exception as e:  # torch raises many types for damaged files
        raise CheckpointError(f"{path}: cannot read: the file is truncated or corrupt ({_reason(e)})") from e


def _reason(e: Exception) -> str:
    """The informative line of a torch.load error (without its advice to turn weights_only off)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    boiler = ("Weights only load failed", "Check the documentation")
    keep = [
        ln.split("WeightsUnpickler error:")[-1].split(" Please use")[0].strip()
        for ln in lines
        if not ln.startswith(boiler)
    ]
    keep = [k for k in keep if k]
    return next((k for k in keep if "GLOBAL" in k), keep[0] if keep else type(e).__name__)


def _refused(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused to load: this pickle needs Python code to be rebuilt ({_reason(e)}). Only files "
        "holding plain tensors, numbers, strings and containers are loaded (torch.load weights_only=True), "
        "because unpickling anything else can run arbitrary code. Use a .safetensors version of the file, "
        "or re-save its state dict with torch.save where you trust it."
    )


TensorTree = Mapping[str, object]  # values: LazyTensor, nested TensorTree, or plain Python values


def read_tensor_file(path: str | Path) -> tuple[TensorTree, dict[str, str]]:
    """(tree of LazyTensor, safetensors metadata) of a checkpoint file. Pickles keep their nesting."""
    path = Path(path)
    kind = sniff(path)
    if kind == "safetensors":
        st = SafetensorsFile(path)
        return st.lazy(), st.metadata
    obj = torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a dict of tensors), got a {type(obj).__name__}"
        )
    return _wrap_tree(obj, path, ""), {}


def read_flat_state_dict(path: str | Path) -> dict[str, LazyTensor]:
    """The tensors of a single-model checkpoint, unread: a flat state dict, or one nested under a
    top-level ``state_dict`` (as Lightning and some training scripts save it). Any other nesting or
    non-tensor entry is an error naming the entry."""
    tree, _ = read_tensor_file(path)
    if isinstance(tree.get("state_dict"), Mapping):
        tree = tree["state_dict"]
    for k, v in tree.items():
        if not isinstance(v, LazyTensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return dict(tree)


def read_state_dict(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """``read_flat_state_dict`` with the data read, tensor by tensor, onto ``device`` (None: CPU) with
    floating-point tensors in ``dtype`` (None: as stored). ``keep(key)``, if given, selects the tensors
    to read; the others are never read."""
    return {
        k: t.load_as(device, dtype if dtype is not None and t.dtype.is_floating_point else t.dtype)
        for k, t in read_flat_state_dict(path).items()
        if keep is None or keep(k)
    }


def _wrap_tree(obj: Mapping, path: Path, prefix: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[str(k)] = LazyTensor.of(v, f"{path}: {name}")
        elif isinstance(v, Mapping):
            out[str(k)] = _wrap_tree(v, path, f"{name}/")
        else:
            out[str(k)] = v
    return out


def write_safetensors(
    path: str | Path,
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write a safetensors file tensor by tensor, atomically (a partial file unique to the run, then
    moved onto ``path``; ``rf_core.io.partial``).

    ``layout`` gives each key's shape and dtype (the header comes first); ``produce(key)`` returns the
    tensor, so only one tensor needs to be in memory at a time. overwrite=False refuses to replace a
    ``path`` that another run made meanwhile (FileExistsError naming the kept partial file).
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for k, (shape, dt) in layout.items():
        if dt not in _ST_NAMES:
            raise CheckpointError(f"{path}: key {k!r}: dtype {dt} cannot be stored in safetensors")
        n = dt.itemsize
        for s in shape:
            n *= s
        header[k] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for k, (shape, dt) in layout.items():
                t = produce(k)
                if t.dtype != dt or tuple(t.shape) != tuple(shape):
                    raise CheckpointError(
                        f"{path}: key {k!r}: expected {dt}{list(shape)} to write, got {t.dtype}{list(t.shape)}"
                    )
                t = t.detach().to("cpu").contiguous()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path, overwrite=overwrite)


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """``write_safetensors`` for tensors already in memory."""
    layout = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    write_safetensors(path, layout, tensors.__getitem__, metadata)


def check_module_keys(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor | LazyTensor],
    source: str,
    file_keys: Mapping[str, str] | None = None,
) -> None:
    """``check_shapes`` against the parameters and buffers of ``module`` (typically built on meta)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_shapes(expected, state_dict, source, type(module).__name__, file_keys)


def check_shapes(
    expected: Mapping[str, tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor | LazyTensor],
    source: str,
    model: str,
    file_keys: Mapping[str, str] | None = None,
) -> None:
    """Raise ``CheckpointError`` listing every missing and unexpected key and every shape mismatch
    between ``state_dict`` (tensors, or ``LazyTensor`` to check before reading any data) and the
    ``expected`` shapes of ``model``. ``file_keys`` maps renamed keys back to the file's names, for
    the message."""
    file_keys = file_keys or {}

    def named(k: str) -> str:
        return f"{k} (file key {file_keys[k]!r})" if file_keys.get(k, k) != k else k

    missing = [k for k in expected if k not in state_dict]
    unexpected = [file_keys.get(k, k) for k in state_dict if k not in expected]
    wrong = [
        f"{named(k)}: expected {list(expected[k])}, got {list(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{source}: checkpoint does not match {model}"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if wrong:
        parts.append(f"shape mismatches ({len(wrong)}): {_listing(wrong)}")
    raise CheckpointError("; ".join(parts))


def _listing(items: list[str], limit: int = 20) -> str:
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def assign_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Check, then make the module's parameters *be* the given tensors (no copy).

    Meant for a module built on the meta device, so that the weights exist in memory once.
    """
    check_module_keys(module, state_dict, source)
    module.load_state_dict(state_dict, strict=True, assign=True)
