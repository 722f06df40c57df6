"""ComfyUI entry point of the Reward Forcing node pack.

Imports cleanly without ComfyUI (pytest collects this file): the node modules import ComfyUI lazily
through ``nodes/comfy.py``.
"""

WEB_DIRECTORY = "./web/js"

# pytest imports this file as a plain module "__init__" (no package) when the checkout's folder name
# is not a Python name, e.g. a clone into comfyui-reward-forcing; ComfyUI always imports it as a package.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
