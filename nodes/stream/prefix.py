"""What opens a stream before it generates: a start image, or a video to extend.

``start_image`` (IMAGE, one image) and ``extend`` (IMAGE frames of one video, or a Wan 2.1 LATENT)
become model-space latents for ``StreamSession.prefill`` and the frames that open the output. Pixels
are fitted to the stream's size and trimmed to 1 + 4k frames (rf_core/prefix.py, with a note), then
encoded with the connected VAE: ComfyUI's Wan 2.1 VAE (Load VAE; its ``encode`` takes IMAGE frames as
one video and returns a raw-VAE-space latent, as VAE Encode does) or the Wan VAE of Load Decoder. A
LATENT needs no encoder; it must have the stream's latent size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from rf_core.prefix import check_frames, encode_prefix, prefix_frames
from rf_core.vae.latent_format import LATENT_CHANNELS, from_comfy_latent
from rf_core.vae.wan_vae import encodable_frames

from ..model_handle import RFDecoder
from .decoders import check_wan_vae

log = logging.getLogger("reward_forcing")

NEEDS_ENCODER = (
    "{what} must be encoded with the Wan 2.1 VAE: connect Load VAE (wan_2.1_vae.safetensors) to vae, or "
    "Reward Forcing: Load Decoder with that file to decoder"
)


@dataclass
class Prefix:
    latents: torch.Tensor  # model space [1 or B, T, 16, h, w], CPU float32
    frames: torch.Tensor | None  # the input's own frames [1, 1 + 4k, H, W, 3] in [0, 1]; None for a LATENT
    notes: list[str] = field(default_factory=list)


def _given(start_image, extend) -> tuple[str, object] | None:
    if start_image is not None and extend is not None:
        raise ValueError(
            "connect start_image or extend, not both (a start image opens a new video; extend continues one)"
        )
    if start_image is not None:
        return "start_image", start_image
    if extend is not None:
        return "extend", extend
    return None


def _is_latent(value) -> bool:
    return isinstance(value, dict)


def _latent_samples(latent: dict, hw: tuple[int, int], videos: int | None) -> torch.Tensor:
    samples = latent.get("samples")
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[1] != LATENT_CHANNELS:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(
            f"extend: expected a Wan 2.1 video LATENT [batch, 16, frames, height/8, width/8], got {shape}"
        )
    h, w = samples.shape[3:]
    if (h, w) != hw:
        raise ValueError(
            f"extend: the LATENT is {w * 8}x{h * 8} ({h}x{w} latent) but the video is {hw[1] * 8}x{hw[0] * 8}: "
            f"set width {w * 8} and height {h * 8}, or connect the frames (IMAGE) instead, which are resized"
        )
    if videos is not None and samples.shape[0] not in (1, videos):
        raise ValueError(
            f"extend: the LATENT holds {samples.shape[0]} videos but this run makes {videos}; connect one video "
            "(it opens every one) or one per video"
        )
    return samples


def _check_pixels(what: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what}: expected an IMAGE, got {type(value).__name__}")
    check_frames(value, what)
    if what == "start_image" and value.shape[0] != 1:
        raise ValueError(
            f"start_image: holds {value.shape[0]} images; connect one (the frames of a video go to extend)"
        )
    return value


def prefix_latent_count(start_image, extend, hw: tuple[int, int], videos: int | None) -> int:
    """Latent frames the connected start image or extension will prefill (0: none), checked without
    encoding anything (``videos``: the videos made, None when not known yet)."""
    given = _given(start_image, extend)
    if given is None:
        return 0
    what, value = given
    if _is_latent(value):
        return _latent_samples(value, hw, videos).shape[2]
    frames = _check_pixels(what, value).shape[0]
    return 1 + (encodable_frames(frames) - 1) // 4


def needs_encoder(start_image, extend) -> str | None:
    """The input that has to be encoded with a VAE ("start_image" or "extend"), or None."""
    given = _given(start_image, extend)
    if given is None or _is_latent(given[1]):
        return None
    return given[0]


def prefix_key(start_image, extend) -> tuple | None:
    """Tells inputs apart cheaply (a session starts over when it changes): the shape, the sum of every
    value and a sample of them, with no copy of a long video."""
    given = _given(start_image, extend)
    if given is None:
        return None
    what, value = given
    t = value["samples"] if _is_latent(value) else value
    x = t.detach().flatten()
    sample = x[:: max(1, x.numel() // 4096)].tolist()
    return (what, _is_latent(value), tuple(t.shape), x.sum(dtype=torch.float64).item(), tuple(sample))


def read_prefix(start_image, extend, vae, decoder, width: int, height: int, videos: int) -> Prefix | None:
    """The prefix the connected inputs give, encoded; None when neither is connected."""
    given = _given(start_image, extend)
    if given is None:
        return None
    what, value = given
    hw = (height // 8, width // 8)
    if _is_latent(value):
        if "noise_mask" in value:
            log.warning(
                "Reward Forcing: extend: the LATENT's noise_mask is not used (the whole latent is kept)"
            )
        return Prefix(from_comfy_latent(_latent_samples(value, hw, videos).float().cpu()), None)
    frames, notes = prefix_frames(_check_pixels(what, value), width, height, what)
    for note in notes:
        log.warning("Reward Forcing: %s", note)
    return Prefix(_encode(frames, what, vae, decoder), frames[None], notes)


def _encode(frames: torch.Tensor, what: str, vae, decoder: RFDecoder | None) -> torch.Tensor:
    """Model-space latents [1, T, 16, h, w] of frames [1 + 4k, H, W, 3] in [0, 1]."""
    if vae is not None:
        check_wan_vae(vae)
        with torch.no_grad():
            raw = vae.encode(frames)  # [1, 16, T, h, w], raw VAE space
        return from_comfy_latent(raw.float().cpu())
    if decoder is not None:
        if not isinstance(decoder, RFDecoder):
            raise ValueError(
                f"decoder: expected an RF_DECODER from 'Load Decoder', got {type(decoder).__name__}"
            )
        if decoder.kind != "wan":
            raise ValueError(
                f"{what}: the connected decoder is TAEHV ({decoder.name}), which cannot encode: connect Load VAE "
                f"(wan_2.1_vae.safetensors) to vae instead, or encode {what} with VAE Encode and connect the "
                "LATENT to extend"
            )
        return encode_prefix(decoder.managed.acquire(), frames)
    raise ValueError(NEEDS_ENCODER.format(what=what))
