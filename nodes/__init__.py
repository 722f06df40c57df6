"""ComfyUI nodes: thin adapters from ComfyUI types to rf_core calls.

Each module exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS; they are merged here.
"""

from importlib import import_module

_MODULES: tuple[str, ...] = (
    "loaders",
    "settings",
    "generate",
    "session_nodes",
    "decode",
    "prompts",
    "save_video",
    "live",
)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in _MODULES:
    _mod = import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
