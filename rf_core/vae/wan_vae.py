"""Wan 2.1 video VAE (encoder + decoder) with checkpoint-compatible state-dict keys.

Layout and key names are those of ``Wan2.1_VAE.pth`` and ComfyUI's ``wan_2.1_vae.safetensors``
(194 tensors, 126,892,531 parameters at ``dim=96``). Stride (4, 8, 8): a video
``[B, 3, 1 + 4k, H, W]`` maps to latents ``[B, 16, 1 + k, H/8, W/8]``.

Decoding follows Wan's causal schedule: the first latent frame gives 1 video frame and every
later one 4. The decoder processes any number of latent frames per call; with a
:class:`~rf_core.vae.wan_layers.CausalCache` carried between calls the result equals decoding
the whole video at once (see ``rf_core.vae.stream_decode`` for the streaming front end).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rf_core.io.safe_load import CheckpointError, assign_state_dict, read_state_dict
from rf_core.vae.latent_format import LATENT_CHANNELS, latent_stats
from rf_core.vae.tensor_utils import at_least_fp32
from rf_core.vae.wan_fast_decode import FastDecoderPath
from rf_core.vae.wan_layers import (
    AttentionBlock,
    CausalCache,
    CausalConv3d,
    Downsample,
    ResidualBlock,
    RMSNorm,
    Upsample,
)

TIME_STRIDE = 4
SPACE_STRIDE = 8


@dataclass(frozen=True)
class WanVAEConfig:
    """Shape of a Wan-style VAE. The defaults are Wan 2.1's; tests use e.g. ``dim=8``."""

    dim: int = 96
    z_dim: int = LATENT_CHANNELS
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if self.z_dim != LATENT_CHANNELS:
            raise ValueError(
                f"z_dim must be {LATENT_CHANNELS} (the Wan 2.1 latent statistics), got {self.z_dim}"
            )
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per resampling stage (len(dim_mult) - 1)")


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Downsample(out_dim, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.ModuleList(blocks)
        top = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top)])
        # Index 1 is the (weightless) SiLU, kept so that the conv's key is head.2.*.
        self.head = nn.Sequential(RMSNorm(top), nn.SiLU(), CausalConv3d(top, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        top = dims[0]
        self.middle = nn.ModuleList([ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top)])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every Upsample halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Upsample(out_dim, temporal=temporal_upsample[i]))
        self.upsamples = nn.ModuleList(blocks)
        # Index 1 is the (weightless) SiLU, kept so that the conv's key is head.2.*.
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))
        self.fast_path: FastDecoderPath | None = None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """Latents after ``conv2`` ``[B, z, n, h, w]`` → video in about [-1, 1] ``[B, 3, F, 8h, 8w]``.

        ``cache=None`` treats x as a whole video; otherwise x continues the stream in ``cache``.
        """
        if self.fast_path is not None:
            return self.fast_path(self, x, cache)
        x = self.conv1(x, cache)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


class WanVAE(nn.Module):
    """Wan 2.1 VAE. Latents are channel-major ``[B, 16, T, h, w]``; "normalised" means model space."""

    def __init__(self, config: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or WanVAEConfig()
        z = self.config.z_dim
        self.encoder = Encoder3d(self.config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(self.config)
        self.memory_format = torch.contiguous_format
        # mean/std per (device, dtype), kept out of the state dict and out of .to(dtype).
        self._latent_stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def use_channels_last(self) -> "WanVAE":
        """Switch weights and activations to channels-last (often faster with cuDNN in bf16/fp16)."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.to(memory_format=torch.channels_last_3d)
            elif isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last_3d
        return self

    def make_fast(
        self, compile: bool = True, mode: str | None = None, frames_per_pass: int | None = None
    ) -> "WanVAE":
        """Switch (in place) to the fast decoding path: channels-last, and the decoder run as pure
        tensor functions (:mod:`rf_core.vae.wan_fast_decode`), each ``torch.compile``-d with static
        shapes when ``compile``; ``mode`` is torch.compile's. ``frames_per_pass`` runs the two
        largest resolutions on that many frames at a time (lower peak memory, same result).
        Same results as the plain path up to the rounding of the compiled kernels; the causal
        cache format does not change.
        """
        self.use_channels_last()
        self.decoder.fast_path = FastDecoderPath(compile=compile, mode=mode, frames_per_pass=frames_per_pass)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.device, dtype)
        stats = self._latent_stats.get(key)
        if stats is None:
            mean, std = latent_stats(self.device, dtype)
            stats = self._latent_stats[key] = (mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1))
        return stats

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent → model space, in float32 (float64 stays float64)."""
        mu = at_least_fp32(mu)
        mean, std = self._stats(mu.dtype)
        return (mu - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latent → raw VAE latent, in float32 (float64 stays float64)."""
        z = at_least_fp32(z)
        mean, std = self._stats(z.dtype)
        return z * std + mean

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)

    def encode(
        self, video: torch.Tensor, *, normalize: bool = True, latents_per_step: int | None = 3
    ) -> torch.Tensor:
        """Video ``[B, 3, 1 + 4k, H, W]`` in [-1, 1] → latent mean ``[B, 16, 1 + k, H/8, W/8]`` (float32).

        ``latents_per_step`` bounds memory by encoding that many latent frames' worth of video per
        pass (the result does not depend on it); ``None`` encodes everything in one pass.
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode: expected a video [B, 3, T, H, W], got shape {list(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % TIME_STRIDE or h % SPACE_STRIDE or w % SPACE_STRIDE:
            raise ValueError(
                f"encode: need T = 1 + 4k frames and H, W multiples of 8, got T={t}, H={h}, W={w}"
            )
        x = self._to_input(video)
        if latents_per_step is None:
            out = self.encoder(x)
        else:
            cache = CausalCache()
            pieces = []
            for j in range(0, 1 + (t - 1) // TIME_STRIDE, latents_per_step):
                # Latent j covers frame 0 (j = 0) or frames 4j-3 .. 4j.
                start = max(0, TIME_STRIDE * j - 3)
                stop = TIME_STRIDE * (j + latents_per_step) - 3
                pieces.append(self.encoder(x[:, :, start:stop], cache))
            out = torch.cat(pieces, dim=2)
        mu = at_least_fp32(self.conv1(out).chunk(2, dim=1)[0])
        return self.normalize(mu) if normalize else mu

    def encode_frames(self, frames: torch.Tensor, *, latents_per_step: int | None = 3) -> torch.Tensor:
        """Frames ``[B, 1 + 4k, 3, H, W]`` in [0, 1] (the stream decoders' layout) → model-space
        latents ``[B, 1 + k, 16, H/8, W/8]`` (float32), ready for ``StreamSession.prefill``.

        A start image is one frame (one latent); see :func:`encodable_frames` to trim a video.
        """
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(
                f"encode_frames: expected frames [B, F, 3, H, W], got shape {list(frames.shape)}"
            )
        video = frames.transpose(1, 2) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]
        return self.encode(video, latents_per_step=latents_per_step).transpose(1, 2).contiguous()

    def decode_step(
        self, z: torch.Tensor, cache: CausalCache | None, *, normalized: bool = True
    ) -> torch.Tensor:
        """Decode latents ``[B, 16, n, h, w]`` continuing the stream in ``cache`` (``None``: a whole video).

        Returns the decoder's raw output in the model dtype (about [-1, 1], not clamped):
        ``1 + 4(n - 1)`` frames at the start of a stream, ``4n`` afterwards.
        """
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(
                f"decode: expected latents [B, {self.config.z_dim}, T, h, w], got shape {list(z.shape)}"
            )
        raw = self.denormalize(z.to(self.device)) if normalized else z
        return self.decoder(self.conv2(self._to_input(raw)), cache)

    def decode(
        self, z: torch.Tensor, *, normalized: bool = True, latents_per_step: int | None = 3
    ) -> torch.Tensor:
        """Latents ``[B, 16, T, h, w]`` → video ``[B, 3, 1 + 4(T-1), 8h, 8w]`` float32 clamped to [-1, 1].

        ``latents_per_step`` bounds memory by decoding that many latent frames per pass with the
        causal cache carried over (the result does not depend on it); ``None``: one pass.
        """
        if latents_per_step is None:
            out = self.decode_step(z, None, normalized=normalized)
        else:
            cache = CausalCache()
            steps = range(0, z.shape[2], latents_per_step)
            out = torch.cat(
                [
                    self.decode_step(z[:, :, i : i + latents_per_step], cache, normalized=normalized)
                    for i in steps
                ],
                dim=2,
            )
        return at_least_fp32(out).clamp_(-1.0, 1.0)


def encodable_frames(frames: int) -> int:
    """The most frames of a ``frames``-long video that encode whole: 1 + 4k (0 if there are none).
    The encoder takes the first frame alone and every later latent from 4 frames."""
    return 0 if frames < 1 else 1 + TIME_STRIDE * ((frames - 1) // TIME_STRIDE)


def infer_wan_vae_config(state_dict: dict[str, torch.Tensor], source: str) -> WanVAEConfig:
    """Read ``dim`` from a Wan 2.1 VAE state dict (other settings are fixed by the architecture)."""
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in state_dict:
        raise CheckpointError(
            f"{source}: this is a Wan 2.2 VAE (48 latent channels); only the Wan 2.1 VAE is supported"
        )
    for key in ("decoder.head.2.weight", "conv2.weight"):
        if key not in state_dict:
            raise CheckpointError(f"{source}: not a Wan 2.1 VAE checkpoint (key {key!r} is missing)")
    return WanVAEConfig(dim=state_dict["decoder.head.2.weight"].shape[1])


def wan_vae_from_state_dict(
    state_dict: dict[str, torch.Tensor], source: str = "state dict", config: WanVAEConfig | None = None
) -> WanVAE:
    """Build a :class:`WanVAE` whose parameters are the given tensors (built on meta, no copy)."""
    config = config or infer_wan_vae_config(state_dict, source)
    with torch.device("meta"):
        model = WanVAE(config)
    assign_state_dict(model, state_dict, source)
    return model.eval().requires_grad_(False)


def load_wan_vae(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: WanVAEConfig | None = None,
) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` or ``wan_2.1_vae.safetensors`` (or a smaller file of the same layout).

    Keys and shapes are checked first; a mismatch raises :class:`CheckpointError` naming the
    file, the keys and the expected vs found shapes. ``dtype=None`` keeps the file's dtype.
    """
    state_dict = read_state_dict(path, device=device, dtype=dtype)
    return wan_vae_from_state_dict(state_dict, source=str(path), config=config)
