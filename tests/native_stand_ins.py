"""Stand-ins for the native ComfyUI nodes the example workflows use, for the graph executor.

They reproduce the interfaces the pack relies on, not ComfyUI's internals:
- CLIPTextEncode: CONDITIONING ``[[tensor [1, max(512, tokens), width], {"pooled_output": None}]]``
  with zero rows after the prompt's tokens (as umT5 in ComfyUI), deterministic per text, through the
  CLIP object's ``tokenize`` and ``encode_from_tokens_scheduled`` as ComfyUI's node calls them.
- VAELoader / VAEDecode: an object shaped like ``comfy.sd.VAE`` for a Wan 2.1 VAE (latent_channels
  16, latent_dim 3, ``first_stage_model.conv2`` and ``.decoder(x, feat_cache=, feat_idx=)``) whose
  ``decode`` takes a raw-VAE-space LATENT [B, 16, T, h, w] and decodes the whole video at once, and
  whose ``encode`` takes IMAGE frames [N, H, W, C] as one video (as VAE Encode passes them) and gives
  the raw latent [1, 16, 1 + (N - 1) // 4, H/8, W/8], built on rf_core's Wan VAE. The real ComfyUI
  classes are exercised by tests/e2e.
- LoadImage / LoadVideo / GetVideoComponents: read files from an input folder (``folder``): an IMAGE
  [1, H, W, 3] and a MASK; a VIDEO whose components are the frames [F, H, W, 3] and the frame rate.
- CreateVideo / SaveVideo: keep the frames; SaveVideo reports the frame count in its UI output.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from rf_core.io.video import read_image, read_video
from rf_core.vae.wan_layers import CausalCache
from rf_core.vae.wan_vae import encodable_frames, load_wan_vae

TEXT_WIDTH = {"value": 64}  # width of the fake text encoder's output (the tiny DiT's text_dim)


class FakeCLIP:
    def tokenize(self, text: str) -> dict:
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens: dict) -> list:
        return [[self.encode(tokens["text"]), {"pooled_output": None}]]

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
        return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),)


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

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE frames [N, H, W, C] (one video) -> raw latent [1, 16, 1 + (N - 1) // 4, H/8, W/8]. As
        ComfyUI's: the size is centre-cropped to multiples of 8 and the frames after the last whole
        group of 4 are not encoded."""
        h, w = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
        top, left = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        x = pixels[: encodable_frames(pixels.shape[0]), top : top + h, left : left + w, :3]
        video = x.movedim(-1, 0)[None] * 2 - 1  # [1, 3, N, H, W] in [-1, 1]
        return self.wan.encode(video, normalize=False).float()


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


class LoadImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    folder = {"value": None}

    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(p.name for p in cls.folder["value"].iterdir()) if cls.folder["value"] else []
        return {"required": {"image": (files, {"image_upload": True})}}

    def load_image(self, image):
        rgb = torch.from_numpy(read_image(self.folder["value"] / image)).float() / 255
        return (rgb, torch.zeros(1, 64, 64))


class LoadVideo:
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (LoadImage.INPUT_TYPES()["required"]["image"][0], {})}}

    def load(self, file):
        frames, fps = read_video(LoadImage.folder["value"] / file)
        return ({"images": torch.from_numpy(frames).float() / 255, "fps": fps},)


class GetVideoComponents:
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO", {})}}

    def get(self, video):
        return (video["images"], None, float(video["fps"]))


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


NATIVE = {
    c.__name__: c
    for c in (
        CLIPLoader,
        CLIPTextEncode,
        VAELoader,
        VAEDecode,
        LoadImage,
        LoadVideo,
        GetVideoComponents,
        CreateVideo,
        SaveVideo,
    )
}
