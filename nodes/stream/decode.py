"""Decode: a Wan 2.1 LATENT to frames with a streaming decoder, a few latent frames at a time."""

from __future__ import annotations

import torch

from rf_core.vae.latent_format import from_comfy_latent

from .. import comfy
from ..common import CATEGORY, comfy_vae_input
from .decoders import decoder_stream


class RewardForcingDecode:
    DESCRIPTION = (
        "Decode a Wan 2.1 LATENT chunk by chunk with a streaming decoder: ComfyUI's Wan VAE (same frames as "
        "VAE Decode, less memory, a preview per chunk) or our Load Decoder output (e.g. TAEHV, much faster)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Frames [B * (1 + 4 (T - 1)), H, W, 3].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "Wan 2.1 video latent (e.g. from Stream Generate)."}),
                "chunk_frames": (
                    "INT",
                    {
                        "default": 3,
                        "min": 1,
                        "max": 64,
                        "tooltip": "Latent frames decoded per step (memory vs speed).",
                    },
                ),
            },
            "optional": {
                "vae": comfy_vae_input("decodes the latent chunk by chunk."),
                "decoder": ("RF_DECODER", {"tooltip": "Our decoder (Load Decoder): Wan VAE or TAEHV."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def decode(self, samples, chunk_frames: int = 3, vae=None, decoder=None, unique_id: str | None = None):
        stream, _ = decoder_stream(vae, decoder)
        if stream is None:
            raise ValueError("connect a VAE (Load VAE) or a decoder (Reward Forcing: Load Decoder) to decode")
        latent = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(latent, torch.Tensor):
            raise ValueError("samples: expected a LATENT dict with a 'samples' tensor")
        z = from_comfy_latent(latent)  # [B, T, 16, h, w], model space
        steps = range(0, z.shape[1], chunk_frames)
        progress = comfy.Progress(len(steps), unique_id)
        frames = []
        for i, start in enumerate(steps):
            rgb = stream.decode_chunk(z[:, start : start + chunk_frames]).permute(0, 1, 3, 4, 2).float().cpu()
            frames.append(rgb)
            progress.update(i + 1, rgb[0, -1])
        images = torch.cat(frames, dim=1).flatten(0, 1)
        return (images.to(comfy.intermediate_device()),)


NODE_CLASS_MAPPINGS = {"RewardForcingDecode": RewardForcingDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardForcingDecode": "Reward Forcing: Decode"}
