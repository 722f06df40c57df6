"""ComfyUI entry point of the Reward Forcing node pack.

Imports cleanly without ComfyUI (pytest collects this file): the node modules import ComfyUI lazily
through ``nodes/comfy.py``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
