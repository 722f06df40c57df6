"""Rewards for Re-DMD behind one interface.

A reward is any callable ``reward(frames, prompts) -> Tensor [B]`` where ``frames`` is
``[B, T, 3, H, W]`` in [0, 1] (decoded video) and ``prompts`` the B prompt texts (possibly empty
strings). Higher is better; Re-DMD weights each sample by exp(β·r), so a reward should be roughly
standardised (VideoAlign's normalised scores are, with a spread of about 1).

Built in: ``motion`` (weight-free, mean absolute frame difference), ``videoalign`` (Qwen2-VL
VideoReward, optional ``transformers`` dependency, see :mod:`rf_core.train.videoalign`), ``none``
(plain DMD). A user's own reward is loaded from an import path ``"package.module:callable"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class Reward(Protocol):
    def __call__(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class MotionReward:
    """Weight-free motion reward: r = clamp((m − center) / scale, ±limit) with m the mean absolute
    difference of consecutive frames (luma, after ``pool``× average pooling to ignore pixel noise).

    ``center`` and ``scale`` set which amount of motion counts as average; the defaults suit
    [0, 1] video where natural clips have m ≈ 0.01–0.06. The clamp keeps exp(β·r) bounded.
    """

    needs_pixels = False  # also meaningful on latents (used when no VAE is given)

    def __init__(self, center: float = 0.03, scale: float = 0.02, limit: float = 3.0, pool: int = 4) -> None:
        if scale <= 0:
            raise ValueError(f"motion reward scale must be > 0, got {scale}")
        if pool < 1:
            raise ValueError(f"motion reward pool must be >= 1, got {pool}")
        self.center, self.scale, self.limit, self.pool = center, scale, limit, pool

    def motion(self, frames: torch.Tensor) -> torch.Tensor:
        """Mean absolute temporal difference per sample [B] (float32)."""
        if frames.ndim != 5 or frames.shape[1] < 2:
            raise ValueError(f"motion reward needs frames [B, T >= 2, C, H, W], got {list(frames.shape)}")
        x = frames.float()
        if x.shape[2] == 3:  # luma of RGB video; other channel counts (latents) are averaged
            x = 0.299 * x[:, :, 0] + 0.587 * x[:, :, 1] + 0.114 * x[:, :, 2]
        else:
            x = x.mean(dim=2)
        b, t, h, w = x.shape
        k = min(self.pool, h, w)
        x = F.avg_pool2d(x.reshape(b * t, 1, h, w), k).reshape(b, t, -1)
        return (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2))

    def __call__(self, frames: torch.Tensor, prompts: Sequence[str] = ()) -> torch.Tensor:
        r = (self.motion(frames) - self.center) / self.scale
        return r.clamp(-self.limit, self.limit)


def load_callable(path: str) -> Callable:
    """Import ``"package.module:attribute"`` (the attribute may be dotted)."""
    if ":" not in path:
        raise ValueError(f"reward import path must look like 'package.module:callable', got {path!r}")
    mod_name, attr = path.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as err:
        raise ValueError(f"cannot import reward module {mod_name!r} (from {path!r}): {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_reward(kind: str, options: dict | None = None, device: torch.device | str = "cpu") -> Reward | None:
    """The reward named by ``kind``: "none", "motion", "videoalign" or an import path. ``options``
    are keyword arguments of the reward (for an import path: of the callable if it is a class or
    factory, i.e. ``callable(**options)`` must return the reward; with no options the callable
    itself is the reward)."""
    options = dict(options or {})
    if kind in ("none", "", None):
        return None
    if kind == "motion":
        return MotionReward(**options)
    if kind == "videoalign":
        from rf_core.train.videoalign import VideoAlignReward

        return VideoAlignReward.from_dir(device=device, **options)
    fn = load_callable(kind)
    reward = fn(**options) if options else fn
    if not callable(reward):
        raise ValueError(f"reward {kind!r} is not callable")
    return reward


def needs_pixels(reward: Reward | None) -> bool:
    """Whether the reward must see decoded RGB video (default True: rewards are defined on frames)."""
    return reward is not None and getattr(reward, "needs_pixels", True)
