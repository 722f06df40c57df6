"""Save and load prompt embeddings, so sessions run without the 11 GB text encoder loaded."""

from __future__ import annotations

import os

from rf_core.text.embeddings import (
    PromptEmbedding,
    PromptEmbeddingError,
    load_prompt_embeddings,
    save_prompt_embeddings,
)

from .. import comfy
from ..common import CATEGORY
from ..conditioning import to_conditioning

comfy.register_model_folder(comfy.PROMPT_FOLDER)

ENCODER_NAME = "comfyui-conditioning"


def _target_file(filename: str) -> str:
    name = filename.strip()
    if not name:
        raise ValueError("filename is empty: give a name such as 'my_prompts'")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    roots = comfy.model_folder_paths(comfy.PROMPT_FOLDER)
    if not roots:
        raise ValueError(f"no models/{comfy.PROMPT_FOLDER} folder is configured")
    root = os.path.abspath(roots[0])
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath((root, path)) != root:
        raise ValueError(f"filename {filename!r} points outside models/{comfy.PROMPT_FOLDER}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


class RewardForcingSavePromptEmbeddings:
    DESCRIPTION = (
        "Store a prompt's embeddings (e.g. from CLIPTextEncode) under a name in "
        "models/reward_forcing_prompts/<filename>.safetensors; a file holds many named prompts."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The same conditioning, passed through.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "Prompt to store (one CLIPTextEncode output)."}),
                "filename": (
                    "STRING",
                    {"default": "my_prompts", "tooltip": "File name in models/reward_forcing_prompts."},
                ),
                "entry": (
                    "STRING",
                    {
                        "default": "prompt",
                        "tooltip": "Name of this prompt inside the file (replaced if present).",
                    },
                ),
            },
            "optional": {
                "prompt_text": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "The prompt's text, kept with it for reference.",
                    },
                ),
            },
        }

    def save(self, conditioning, filename: str, entry: str, prompt_text: str = ""):
        if not entry.strip():
            raise ValueError("entry is empty: give the prompt a name such as 'prompt'")
        if not isinstance(conditioning, (list, tuple)) or len(conditioning) != 1:
            raise ValueError("conditioning: expected one CLIPTextEncode output (a single conditioning entry)")
        embeds = conditioning[0][0]
        if embeds.ndim != 3 or embeds.shape[0] != 1:
            raise ValueError(f"conditioning: expected a [1, tokens, width] tensor, got {list(embeds.shape)}")
        path = _target_file(filename)
        entries = load_prompt_embeddings(path, dim=None).entries if os.path.isfile(path) else {}
        entries[entry] = PromptEmbedding(prompt_text, embeds[0].detach().cpu())
        save_prompt_embeddings(path, entries, ENCODER_NAME)
        return {"ui": {"text": [f"saved {entry!r} to {os.path.basename(path)}"]}, "result": (conditioning,)}


class RewardForcingLoadPromptEmbeddings:
    DESCRIPTION = "Load a stored prompt as CONDITIONING (no text encoder needed)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The stored prompt, like CLIPTextEncode's output.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "file": (
                    comfy.filename_list(comfy.PROMPT_FOLDER),
                    {"tooltip": "A prompt-embedding file from models/reward_forcing_prompts."},
                ),
                "entry": ("STRING", {"default": "prompt", "tooltip": "Name of the prompt inside the file."}),
            }
        }

    def load(self, file: str, entry: str):
        path = comfy.full_path((comfy.PROMPT_FOLDER,), file)
        try:
            stored = load_prompt_embeddings(path, dim=None)
            item = stored[entry]
        except KeyError as err:
            raise ValueError(f"{file}: {err.args[0]}") from None
        except PromptEmbeddingError as err:
            raise ValueError(str(err)) from err
        return (to_conditioning(item.embeds),)


NODE_CLASS_MAPPINGS = {
    "RewardForcingSavePromptEmbeddings": RewardForcingSavePromptEmbeddings,
    "RewardForcingLoadPromptEmbeddings": RewardForcingLoadPromptEmbeddings,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardForcingSavePromptEmbeddings": "Reward Forcing: Save Prompt Embeddings",
    "RewardForcingLoadPromptEmbeddings": "Reward Forcing: Load Prompt Embeddings",
}
