"""TAEHV tiny video decoder for Wan 2.1 latents (``taew2_1.pth`` from madebyollin/taehv).

A cheap stand-in for the Wan VAE decoder: 2-D convolutions per frame plus "memory blocks"
that also see their own input at the previous time step, and two temporal 2x expansions
(``TGrow``). It reads model-space (normalised) Wan latents directly, frame-major
``[B, T, 16, h, w]``, and produces 4 frames per latent in about [0, 1]; the first 3 frames of a
stream are startup frames and are dropped, giving the same ``1 + 4(T - 1)`` count as the Wan VAE.

Decoder indices (checkpoint keys ``decoder.{i}.*``): 0 clamp, 1 conv, 2 ReLU, 3-5 MemBlock,
6 upsample, 7 TGrow, 8 conv, 9-11 MemBlock, 12 upsample, 13 TGrow, 14 conv, 15-17 MemBlock,
18 upsample, 19 TGrow, 20 conv, 21 ReLU, 22 conv. The file's ``encoder.*`` tensors are not used.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rf_core.io.safe_load import CheckpointError, assign_state_dict, read_state_dict
from rf_core.vae.latent_format import LATENT_CHANNELS
from rf_core.vae.tensor_utils import at_least_fp32


@dataclass(frozen=True)
class TAEHVConfig:
    """Decoder widths per stage and which stages double time. Defaults are taew2_1's."""

    widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    time_upscale: tuple[bool, bool, bool] = (False, True, True)
    latent_channels: int = LATENT_CHANNELS

    @property
    def time_stride(self) -> int:
        return 2 ** sum(self.time_upscale)

    @property
    def frames_to_trim(self) -> int:
        """Startup frames at the head of every decoded stream (3 for taew2_1)."""
        return self.time_stride - 1


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the input latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block that sees its input and its input at the previous time step."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        # ReLUs at 1 and 3 carry no weights; kept so the keys are conv.{0,2,4}.*.
        self.conv = nn.Sequential(
            _conv3x3(n_in * 2, n_out), nn.ReLU(), _conv3x3(n_out, n_out), nn.ReLU(), _conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TGrow(nn.Module):
    """1x1 conv to ``stride`` times the channels, read as ``stride`` consecutive frames."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)


class TAEHV(nn.Module):
    """The TAEHV decoder. Works on ``[B*T, C, H, W]`` frames; see :meth:`decode_step`."""

    def __init__(self, config: TAEHVConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or TAEHVConfig()
        n = cfg.widths
        layers: list[nn.Module] = [Clamp(), _conv3x3(cfg.latent_channels, n[0]), nn.ReLU()]
        for stage in range(3):
            layers += [MemBlock(n[stage], n[stage]) for _ in range(3)]
            layers += [
                nn.Upsample(scale_factor=2),
                TGrow(n[stage], 2 if cfg.time_upscale[stage] else 1),
                _conv3x3(n[stage], n[stage + 1], bias=False),
            ]
        layers += [nn.ReLU(), _conv3x3(n[3], 3)]
        self.decoder = nn.Sequential(*layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    def decode_step(self, z: torch.Tensor, memory: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """Latents ``[B, n, 16, h, w]`` → ``[B, 4n, 3, 8h, 8w]`` raw frames (untrimmed, unclamped).

        ``memory`` maps each MemBlock's index to its last input frame ``[B, 1, C, H, W]`` and is
        updated in place; ``None`` or an empty dict starts a new stream (zero memory).
        All frames of the step run in parallel.
        """
        if z.ndim != 5 or z.shape[2] != self.config.latent_channels:
            raise ValueError(
                f"TAEHV: expected latents [B, T, {self.config.latent_channels}, h, w], got shape {list(z.shape)}"
            )
        b = z.shape[0]
        x = z.to(device=self.device, dtype=self.dtype).flatten(0, 1)
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                frames = x.unflatten(0, (b, -1))
                previous = memory.get(i) if memory is not None else None
                if previous is None:
                    previous = torch.zeros_like(frames[:, :1])
                past = torch.cat([previous, frames[:, :-1]], dim=1).flatten(0, 1)
                if memory is not None:
                    memory[i] = frames[:, -1:].clone()
                x = layer(x, past)
            else:
                x = layer(x)
        return x.unflatten(0, (b, -1))

    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """Whole video at once: ``[B, T, 16, h, w]`` → ``[B, 1 + 4(T-1), 3, 8h, 8w]`` in [0, 1]."""
        return at_least_fp32(self.decode_step(z, None)[:, self.config.frames_to_trim :]).clamp(0, 1)


def _tgrow_keys(model: TAEHV) -> list[str]:
    return [f"decoder.{i}.conv.weight" for i, m in enumerate(model.decoder) if isinstance(m, TGrow)]


def infer_taehv_config(state_dict: dict[str, torch.Tensor], source: str) -> TAEHVConfig:
    """Read the stage widths from the decoder's conv shapes (keys 1, 8, 14, 20)."""
    keys = ("decoder.1.weight", "decoder.8.weight", "decoder.14.weight", "decoder.20.weight")
    for key in keys:
        if key not in state_dict:
            raise CheckpointError(f"{source}: not a TAEHV decoder checkpoint (key {key!r} is missing)")
    first = state_dict[keys[0]]
    if first.shape[1] != LATENT_CHANNELS:
        raise CheckpointError(
            f"{source}: TAEHV decoder takes {first.shape[1]} latent channels; only Wan 2.1 "
            f"({LATENT_CHANNELS}, taew2_1) is supported"
        )
    widths = tuple(state_dict[k].shape[0] for k in keys)
    return TAEHVConfig(widths=widths)


def taehv_from_state_dict(
    state_dict: dict[str, torch.Tensor], source: str = "state dict", config: TAEHVConfig | None = None
) -> TAEHV:
    """Build a :class:`TAEHV` decoder from a state dict holding ``decoder.*`` (other keys: error)."""
    config = config or infer_taehv_config(state_dict, source)
    with torch.device("meta"):
        model = TAEHV(config)
    state_dict = dict(state_dict)
    expected = model.state_dict()
    for key in _tgrow_keys(model):
        # Files may hold a TGrow for more frames than this decoder makes; its last output
        # channels are the ones for the last frames (the same convention as madebyollin/taehv).
        if key in state_dict and state_dict[key].shape[0] > expected[key].shape[0]:
            state_dict[key] = state_dict[key][-expected[key].shape[0] :]
    assign_state_dict(model, state_dict, source)
    return model.eval().requires_grad_(False)


def load_taehv(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: TAEHVConfig | None = None,
) -> TAEHV:
    """Load ``taew2_1.pth`` / ``taew2_1.safetensors``; the file's ``encoder.*`` tensors are skipped."""
    state_dict = read_state_dict(
        path, device=device, dtype=dtype, keep=lambda k: not k.startswith("encoder.")
    )
    return taehv_from_state_dict(state_dict, source=str(path), config=config)
