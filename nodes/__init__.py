"""ComfyUI nodes: thin adapters from ComfyUI types to rf_core calls.

Grouped by feature: ``load/`` (model, LoRA, decoder files), ``stream/`` (settings, Stream Generate, Stream
Session, Decode, start image / extension), ``live/`` (the Live node, its loop, page transport and routes),
``prompts/`` (prompt embedding files, Prompt Timeline), ``video/`` (Save Video, MP4 files), ``train/``
(Re-DMD Train). Each node module exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS; they are
merged here.
"""

import os
import sys
from importlib import import_module

# ComfyUI imports the pack by its file path, so its folder is not on sys.path and ``rf_core`` (next to
# this package) would not be importable. Append it: appended, it never shadows ComfyUI's own modules
# (ComfyUI's ``nodes`` module has the same name as this package).
_PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

# One folder per feature; shared pieces (comfy.py, common.py, conditioning.py, model_handle.py) sit here.
_MODULES: tuple[str, ...] = (
    "load.loaders",
    "stream.settings",
    "stream.generate",
    "stream.session",
    "stream.decode",
    "prompts.embeddings",
    "prompts.timeline",
    "video.save",
    "live.node",
    "train.nodes",
)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in _MODULES:
    _mod = import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
