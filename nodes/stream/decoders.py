"""Decoder streams for the nodes: our Wan VAE / TAEHV (RF_DECODER) or ComfyUI's own VAE object.

ComfyUI's ``VAE.decode`` restarts the Wan VAE's causal cache on every call, so decoding chunks one
by one would lose 3 frames per boundary and flicker. ``ComfyVAEStream`` keeps one feature cache per
stream and feeds the decoder latent frame by latent frame, as ``WanVAE.decode`` does inside a
single call, which gives exactly the frames of a whole-video decode.

On CUDA with Triton a ComfyUI Wan VAE is decoded by our fast decoder instead (``WanVAE.make_fast``:
compiled, sub-pixel upsampling), built once from a copy of that VAE's weights and placed by
ComfyUI's memory manager like a Load Decoder file: ComfyUI's own decoder runs eagerly at about half
the speed (docs/benchmarks.md). Same weights, same frames within bf16 rounding.
"""

from __future__ import annotations

import torch

from rf_core.vae.latent_format import LATENT_CHANNELS, to_comfy_latent

from .. import comfy
from ..common import has_triton
from ..model_handle import Managed, RFDecoder


def check_wan_vae(vae) -> None:
    """Refuse a ComfyUI VAE object that is not a Wan 2.1 video VAE, saying which file to load."""
    model = getattr(vae, "first_stage_model", None)
    channels = getattr(vae, "latent_channels", None)
    if (
        channels != LATENT_CHANNELS
        or getattr(vae, "latent_dim", None) != 3
        or not hasattr(model, "decoder")
        or not hasattr(model, "conv2")
    ):
        raise ValueError(
            f"the connected VAE is not a Wan 2.1 video VAE (it has {channels} latent channels, "
            f"latent_dim {getattr(vae, 'latent_dim', None)}): load wan_2.1_vae.safetensors with Load VAE"
        )


class ComfyVAEStream:
    def __init__(self, vae) -> None:
        check_wan_vae(vae)
        self.vae = vae
        self._feat: list | None = None

    def reset(self) -> None:
        self._feat = None

    def rebind(self, other: ComfyVAEStream) -> None:
        """Continue with another VAE object holding the same weights (ComfyUI makes a new one each time
        Load VAE runs again), so the old object can be freed; the feature cache carries over."""
        self.vae = other.vae

    def nbytes(self) -> int:
        """Memory of the feature cache (about 1.9 GB in bf16 at 832x480)."""
        return sum(t.numel() * t.element_size() for t in self._feat or () if isinstance(t, torch.Tensor))

    def prepare(self, z: torch.Tensor) -> None:
        """Load the VAE (on the caller's stream; see rf_core.pipeline.AsyncDecoder)."""
        comfy.vae_load(self.vae, (z.shape[0], z.shape[2], z.shape[1], *z.shape[3:]))

    @torch.no_grad()
    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        raw = to_comfy_latent(z)  # [B, 16, n, h, w]
        comfy.vae_load(self.vae, raw.shape)
        model = self.vae.first_stage_model
        if self._feat is None:
            self._feat = [None] * _count_causal_convs(model.decoder)
        raw = raw.to(self.vae.device, self.vae.vae_dtype)
        x = model.conv2(raw)
        # A fresh index list per latent frame: the decoder walks the cache slots from 0 each call.
        out = torch.cat(
            [
                model.decoder(x[:, :, i : i + 1], feat_cache=self._feat, feat_idx=[0])
                for i in range(x.shape[2])
            ],
            dim=2,
        )
        return ((out.float().clamp(-1, 1) + 1) / 2).transpose(1, 2)


def _count_causal_convs(decoder: torch.nn.Module) -> int:
    """Cache slots the Wan decoder uses: one per causal 3-D convolution (ComfyUI's count_conv3d)."""
    return sum(1 for m in decoder.modules() if type(m).__name__ == "CausalConv3d")


def decoder_stream(vae=None, decoder: RFDecoder | None = None):
    """(stream, identity) for the connected decoder, or (None, None) when nothing is connected."""
    if vae is not None and decoder is not None:
        raise ValueError("connect either a VAE or a Reward Forcing decoder, not both")
    if decoder is not None:
        if not isinstance(decoder, RFDecoder):
            raise ValueError(
                f"decoder: expected an RF_DECODER from 'Load Decoder', got {type(decoder).__name__}"
            )
        return decoder.new_stream(), decoder.identity
    if vae is not None:
        stream = ComfyVAEStream(vae)  # checks that it is a Wan 2.1 VAE
        identity = ("comfy", _fingerprint(vae.first_stage_model))
        fast = _fast_decoder_for(vae, identity)
        return (stream if fast is None else fast.new_stream()), identity
    return None, None


_FAST_FROM_COMFY: dict[tuple, RFDecoder] = {}  # the latest ComfyUI VAE's fast decoder, by fingerprint


def _fast_decoder_for(vae, identity: tuple) -> RFDecoder | None:
    """Our fast Wan decoder with the weights of ComfyUI's ``vae`` (CUDA with Triton only), else None."""
    device = getattr(vae, "device", None)
    if device is None or not fast_decoding_available(torch.device(device)):
        return None
    # The object too: a fingerprint samples a few weights, and ComfyUI makes a new object per load.
    key = (id(vae.first_stage_model), identity, getattr(vae, "vae_dtype", None))
    handle = _FAST_FROM_COMFY.get(key)
    if handle is None:
        from rf_core.vae.wan_vae import WanVAE, infer_wan_vae_config, wan_vae_from_state_dict

        state = vae.first_stage_model.state_dict()
        with torch.device("meta"):
            needed = WanVAE(infer_wan_vae_config(state, "ComfyUI VAE")).state_dict().keys()
        dtype = vae.vae_dtype
        offload = comfy.module("comfy.model_management")
        home = offload.vae_offload_device() if offload is not None else device
        copies = {k: state[k].detach().to(home, dtype, copy=True) for k in needed}
        module = wan_vae_from_state_dict(copies, source="ComfyUI VAE")
        module.make_fast(compile=torch.device(device).type == "cuda")
        handle = RFDecoder(Managed.wrap(module, offload is not None, vae=True), "wan", "ComfyUI VAE", key)
        _FAST_FROM_COMFY.clear()  # one at a time: a VAE with other weights replaces the last one
        _FAST_FROM_COMFY[key] = handle
    return handle


def _fingerprint(module: torch.nn.Module) -> tuple:
    """Identifies a VAE's weights cheaply: ComfyUI hands out a new VAE object whenever Load VAE runs
    again (e.g. after another workflow), and a session should not re-decode for that."""
    params = list(module.parameters())
    picks = (params[0], params[len(params) // 2], params[-1])
    return (len(params), *(tuple(p.detach().flatten()[:4].float().cpu().tolist()) for p in picks))


def fast_decoding_available(device: torch.device) -> bool:
    """Our compiled decoder beats ComfyUI's eager one only where torch.compile has its GPU backend
    (Triton, on GPUs of compute capability 7.0 or newer)."""
    return device.type == "cuda" and has_triton() and torch.cuda.get_device_capability(device) >= (7, 0)
