"""Stand-ins for the native ComfyUI nodes the example workflows use, for the graph executor.

They reproduce the interfaces the pack relies on, not ComfyUI's internals:
- CLIPTextEncode: CONDITIONING ``[[tensor [1, max(512, tokens), width], {"pooled_output": None}]]``
  with zero rows after the prompt's tokens (as umT5 in ComfyUI), deterministic per text.
- VAELoader / VAEDecode: an object shaped like ``comfy.sd.VAE`` for a Wan 2.1 VAE (latent_channels
  16, latent_dim 3, ``first_stage_model.conv2`` and ``.decoder(x, feat_cache=, feat_idx=)``) whose
  ``decode`` takes a raw-VAE-space LATENT [B, 16, T, h, w] and decodes the whole video at once,
  built on rf_core's Wan VAE. The real ComfyUI classes are exercised by tests/e2e.
- CreateVideo / SaveVideo: keep the frames; SaveVideo reports the frame count in its UI output.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from rf_core.vae.wan_layers import CausalCache
from rf_core.vae.wan_vae import load_wan_vae

TEXT_WIDTH = {"value": 64}  # width of the fake text encoder's output (the tiny DiT's text_dim)


class FakeCLIP:
    def encode(self, text: str) -> torch.Tensor:
        tokens = len(text.split()) + 1  # words + EOS
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        out = torch.zeros(1, max(512, tokens), TEXT_WIDTH["value"])
        out[:, :tokens] = 0.3 * torch.randn(1, tokens, TEXT_WIDTH["value"], generator=g)
        return out


class CLIPLoader:
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"clip_name": ("STRING", {}), "type": (["stable_diffusion", "wan"], {})},
            "optional": {"device": (["default", "cpu"], {})},
        }

    def load(self, clip_name, type, device="default"):
        return (FakeCLIP(),)


class CLIPTextEncode:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})}}

    def encode(self, text, clip):
        return ([[clip.encode(text), {"pooled_output": None}]],)


class _DecoderLikeComfy(nn.Module):
    """``decoder(x, feat_cache=list, feat_idx=[0])``. ComfyUI's cache is positional (slot i belongs to the
    i-th causal conv), so a stream can go on with another VAE object holding the same weights. rf_core's
    cache is keyed by layer objects; the list's first slot keeps it with the layers it belongs to, and
    hands the state over, layer by layer in order, when another object's decoder continues the stream."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.inner = decoder

    def forward(self, x, feat_cache=None, feat_idx=(0,)):
        layers = list(self.inner.modules())
        if feat_cache[0] is None:
            feat_cache[0] = (layers, CausalCache())
        owner, cache = feat_cache[0]
        if owner is not layers and owner != layers:
            moved = dict(zip(owner, layers))
            cache.history = {moved[k]: v for k, v in cache.history.items()}
            cache.started = {moved[k] for k in cache.started}
            feat_cache[0] = (layers, cache)
        return self.inner(x, cache)


class _FirstStage(nn.Module):
    def __init__(self, vae) -> None:
        super().__init__()
        self.conv2 = vae.conv2
        self.decoder = _DecoderLikeComfy(vae.decoder)
        self._wan = [vae]  # in a list: not a submodule, so parameters are not listed twice

    def state_dict(self, *args, **kwargs):
        """Under the checkpoint's key names, as ComfyUI's Wan VAE module has them."""
        return self._wan[0].state_dict(*args, **kwargs)


class FakeWanVAE:
    latent_channels = 16
    latent_dim = 3

    def __init__(self, path) -> None:
        self.wan = load_wan_vae(path, dtype=torch.float32)
        self.first_stage_model = _FirstStage(self.wan)
        self.device = torch.device("cpu")
        self.vae_dtype = torch.float32

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE-space latent [B, 16, T, h, w] -> frames [B, F, H, W, 3] in [0, 1] (whole video)."""
        video = self.wan.decode(raw, normalized=False, latents_per_step=None)
        return ((video + 1) / 2).clamp(0, 1).movedim(1, -1)


class VAELoader:
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    folder = {"value": None}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": ("STRING", {})}}

    def load(self, vae_name):
        return (FakeWanVAE(self.folder["value"] / vae_name),)


class VAEDecode:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}}

    def decode(self, samples, vae):
        images = vae.decode(samples["samples"])
        return (images.reshape(-1, *images.shape[-3:]),)


class CreateVideo:
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {}), "fps": ("FLOAT", {"min": 1.0, "max": 120.0})}}

    def create(self, images, fps):
        return ({"images": images, "fps": fps},)


class SaveVideo:
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": ("VIDEO", {}),
                "filename_prefix": ("STRING", {}),
                "format": (["auto", "mp4"], {}),
                "codec": (["auto", "h264"], {}),
            }
        }

    def save(self, video, filename_prefix, format, codec):
        return {"ui": {"frames": [video["images"].shape[0]], "images": video["images"]}}


NATIVE = {c.__name__: c for c in (CLIPLoader, CLIPTextEncode, VAELoader, VAEDecode, CreateVideo, SaveVideo)}
