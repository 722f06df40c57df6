"""Test-only ComfyUI node pack for the e2e tests: saves tensors flowing through a workflow to
``<output>/probe/<name>.pt`` so the test process can compare them (loaded with weights_only=True)."""

import os

import folder_paths
import torch


def _save(name: str, tensor: torch.Tensor) -> dict:
    folder = os.path.join(folder_paths.get_output_directory(), "probe")
    os.makedirs(folder, exist_ok=True)
    torch.save(tensor.detach().cpu().contiguous(), os.path.join(folder, f"{name}.pt"))
    return {"ui": {"probe": [name]}}


class _Probe:
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    CATEGORY = "testing"
    KIND = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (cls.KIND,), "name": ("STRING", {"default": "x"})}}


class RFProbeSaveImage(_Probe):
    KIND = "IMAGE"

    def save(self, value, name):
        return _save(name, value)


class RFProbeSaveLatent(_Probe):
    KIND = "LATENT"

    def save(self, value, name):
        return _save(name, value["samples"])


class RFProbeSaveConditioning(_Probe):
    KIND = "CONDITIONING"

    def save(self, value, name):
        return _save(name, value[0][0])


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (RFProbeSaveImage, RFProbeSaveLatent, RFProbeSaveConditioning)}
