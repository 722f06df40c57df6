"""Every ComfyUI import of the pack, done lazily so the pack imports (and is tested) without ComfyUI.

Outside ComfyUI each helper falls back to something sensible: model folders come from
``set_fallback_folders`` (tests, scripts), outputs go to ``RF_OUTPUT_DIR`` or a temp folder,
progress and interruption are no-ops, and models stay where they were loaded.
"""

from __future__ import annotations

import functools
import importlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

MODEL_FOLDER = "reward_forcing"  # models/reward_forcing, registered in ComfyUI's folder_paths
PROMPT_FOLDER = "reward_forcing_prompts"  # models/reward_forcing_prompts: saved prompt embeddings

_fallback_folders: dict[str, list[str]] = {}


def module(name: str):
    """A ComfyUI module, or None when not running inside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def in_comfyui() -> bool:
    return module("folder_paths") is not None and module("comfy.model_management") is not None


# ----------------------------------------------------------------------------- model folders
def set_fallback_folders(folder: str, paths: Iterable[str | os.PathLike]) -> None:
    """Folders listed for ``folder`` when ComfyUI's folder_paths is absent (tests, scripts)."""
    _fallback_folders[folder] = [str(p) for p in paths]


def register_model_folder(folder: str = MODEL_FOLDER) -> None:
    """Add ``models/<folder>`` to ComfyUI's folder list, keeping paths a user's
    extra_model_paths.yaml may already have registered under that name."""
    fp = module("folder_paths")
    if fp is None:
        return
    path = os.path.join(fp.models_dir, folder)
    known = fp.folder_names_and_paths.get(folder)
    paths = list(known[0]) if known else []
    if path not in paths:
        paths.append(path)
    # A key created from YAML has an empty extension set, which would list every file.
    fp.folder_names_and_paths[folder] = (paths, set(fp.supported_pt_extensions))


def model_folder_paths(folder: str) -> list[str]:
    """The directories of a model folder kind (ComfyUI's list, or the fallback outside ComfyUI)."""
    fp = module("folder_paths")
    if fp is not None:
        return fp.get_folder_paths(folder) if folder in fp.folder_names_and_paths else []
    return list(_fallback_folders.get(folder, []))


_MODEL_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")


def filename_list(*folders: str) -> list[str]:
    """Sorted, de-duplicated model file names of the given folder kinds."""
    fp = module("folder_paths")
    names: set[str] = set()
    for folder in folders:
        if fp is not None:
            if folder in fp.folder_names_and_paths:
                names.update(fp.get_filename_list(folder))
            continue
        for root in _fallback_folders.get(folder, []):
            base = Path(root)
            if base.is_dir():
                names.update(
                    str(p.relative_to(base))
                    for p in base.rglob("*")
                    if p.is_file() and p.suffix.lower() in _MODEL_EXTENSIONS
                )
    return sorted(names)


def full_path(folders: Iterable[str], name: str) -> str:
    """Path of model file ``name`` in the first of ``folders`` that has it; a clear error if none."""
    folders = list(folders)
    fp = module("folder_paths")
    for folder in folders:
        if fp is not None:
            if folder in fp.folder_names_and_paths:
                path = fp.get_full_path(folder, name)
                if path is not None:
                    return path
            continue
        for root in _fallback_folders.get(folder, []):
            path = Path(root) / name
            if path.is_file():
                return str(path)
    where = " or ".join(f"models/{f}" for f in folders)
    raise FileNotFoundError(
        f"model file {name!r} not found in {where}: put the file there and refresh the browser "
        f"(press R), then pick it from the list"
    )


def output_directory() -> str:
    fp = module("folder_paths")
    if fp is not None:
        return fp.get_output_directory()
    path = os.environ.get("RF_OUTPUT_DIR") or os.path.join(tempfile.gettempdir(), "reward_forcing_output")
    os.makedirs(path, exist_ok=True)
    return path


def save_path(prefix: str, width: int, height: int) -> tuple[str, str, int, str]:
    """(folder, file base name, counter, subfolder) of the next numbered output file."""
    out = output_directory()
    fp = module("folder_paths")
    if fp is not None:
        folder, base, counter, subfolder, _ = fp.get_save_image_path(prefix, out, width, height)
        return folder, base, counter, subfolder
    subfolder = os.path.dirname(os.path.normpath(prefix))
    base = os.path.basename(os.path.normpath(prefix))
    folder = os.path.join(out, subfolder)
    os.makedirs(folder, exist_ok=True)
    taken = [f for f in os.listdir(folder) if f.startswith(base + "_")]
    counter = 1 + max((_counter_of(f, base) for f in taken), default=0)
    return folder, base, counter, subfolder


def _counter_of(filename: str, base: str) -> int:
    try:
        return int(filename[len(base) + 1 :].split("_")[0])
    except ValueError:
        return 0


# ----------------------------------------------------------------------------- devices, memory
def torch_device() -> torch.device:
    mm = module("comfy.model_management")
    return mm.get_torch_device() if mm is not None else torch.device("cpu")


def offload_device() -> torch.device:
    mm = module("comfy.model_management")
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE/LATENT outputs live (CPU unless ComfyUI runs with --gpu-only)."""
    mm = module("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def model_patcher(box: torch.nn.Module, size: int, vae: bool = False):
    """A ComfyUI ModelPatcher around ``box``, or None outside ComfyUI. ``vae``: place it like ComfyUI
    places VAEs (``--cpu-vae`` and friends apply)."""
    mp = module("comfy.model_patcher")
    if mp is None:
        return None
    if vae:
        mm = module("comfy.model_management")
        load, offload = mm.vae_device(), mm.vae_offload_device()
    else:
        load, offload = torch_device(), offload_device()
    return mp.ModelPatcher(box, load_device=load, offload_device=offload, size=size)


def load_models(patchers: list, memory_required: int = 0) -> None:
    """Let ComfyUI move the models to the compute device (unloading others to make room for them
    and ``memory_required`` more bytes) and apply their patches (LoRA)."""
    mm = module("comfy.model_management")
    if mm is None or not patchers:
        return
    # Plain torch layers cannot be partially loaded (no comfy.ops casting), so load them whole.
    mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)


def empty_cache() -> None:
    """Return freed GPU memory to the driver (after sessions were dropped)."""
    mm = module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()


def interrupt_check() -> Callable[[], None] | None:
    """ComfyUI's Cancel check: raises InterruptProcessingException once Cancel was pressed."""
    mm = module("comfy.model_management")
    return mm.throw_exception_if_processing_interrupted if mm is not None else None


def delta_patch(delta: Callable[..., torch.Tensor]):
    """A ComfyUI weight patch adding ``strength * delta(device)`` to a weight. ComfyUI applies it
    when the patched model is loaded to the device and restores the original weight on unload."""
    return _delta_patch_class()(delta)


@functools.cache
def _delta_patch_class():
    base = module("comfy.weight_adapter.base").WeightAdapterBase

    class DeltaPatch(base):
        name = "reward_forcing_delta"

        def __init__(self, delta: Callable[..., torch.Tensor]) -> None:
            self.delta = delta
            self.loaded_keys = set()
            self.weights = []

        def calculate_weight(self, weight, key, strength, strength_model, offset, function, *args, **kwargs):
            if strength != 0.0:
                weight += function((strength * self.delta(weight.device)).to(weight.dtype))
            return weight

    return DeltaPatch


def vae_load(vae, latent_shape: tuple) -> None:
    """Load a ComfyUI VAE object's weights onto its device, with room to decode ``latent_shape``."""
    if module("comfy.model_management") is not None:
        load_models([vae.patcher], memory_required=vae.memory_used_decode(latent_shape, vae.vae_dtype))


# ----------------------------------------------------------------------------- progress, previews
class Progress:
    """ComfyUI's node progress bar with an optional preview image; silent outside ComfyUI.

    Note: inside ComfyUI every update also checks Cancel and may raise InterruptProcessingException.
    """

    def __init__(self, total: int, node_id: str | None = None) -> None:
        utils = module("comfy.utils")
        self.bar = utils.ProgressBar(total, node_id=node_id) if utils is not None else None
        self.total = total

    def update(self, value: int, preview: torch.Tensor | None = None) -> None:
        """``preview``: one frame [H, W, 3] in [0, 1]."""
        if self.bar is None:
            return
        image = None
        if preview is not None and self.bar.hook is not None:
            args = getattr(module("comfy.cli_args"), "args", None)
            image = ("JPEG", _to_pil(preview), getattr(args, "preview_size", 512))
        self.bar.update_absolute(value, self.total, image)


def _to_pil(frame: torch.Tensor):
    from PIL import Image  # ComfyUI depends on Pillow

    arr = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)


def progress_text(text: str, node_id: str | None) -> None:
    """A status line on the node (e.g. "chunk 3/7"); ignored outside ComfyUI."""
    server = module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or node_id is None or not hasattr(instance, "send_progress_text"):
        return
    instance.send_progress_text(text, node_id)
