"""Rewards for Re-DMD behind one interface.

A reward is any callable ``reward(frames, prompts) -> Tensor [B]`` where ``frames`` is
``[B, T, 3, H, W]`` in [0, 1] (decoded video) and ``prompts`` the B prompt texts (possibly empty
strings). Higher is better; Re-DMD weights each sample by exp(β·r), so a reward should be roughly
standardised (VideoAlign's normalised scores are, with a spread of about 1).

Built in: ``motion`` (weight-free: frame differences, relative to the latents' spread when it
scores latents), ``videoalign`` (Qwen2-VL
VideoReward, optional ``transformers`` dependency, see :mod:`rf_core.train.videoalign`), ``none``
(plain DMD). A user's own reward is loaded from an import path ``"package.module:callable"``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

log = logging.getLogger("reward_forcing")


@runtime_checkable
class Reward(Protocol):
    def __call__(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class MotionReward:
    """Weight-free motion reward: r = clamp((m − center) / scale, ±limit), m a per-sample amount of
    motion between consecutive frames, measured after ``pool``× average pooling (to ignore pixel
    noise and texture).

    On decoded video (3 channels, [0, 1]) m is the mean absolute difference of consecutive frames'
    luma; ``center`` and ``scale`` suit [0, 1] video, where natural clips have m ≈ 0.01–0.06.

    On latents (any other channel count: the trainer passes latents when no VAE is given) absolute
    differences mean nothing without the VAE's scale, so m is relative: the mean absolute difference
    of consecutive frames over the clip's mean absolute deviation from its per-channel mean (both per
    channel). It is 0 for a still clip and ≈ √2 for frames independent of each other (noise); for
    structure 4 latent pixels wide moving 1, 4 or 8 latent pixels per latent frame (4 %, 15 % or 31 %
    of the frame's width per second at 832 pixels and 16 fps) it is ≈ 0.16, 0.63 or 1.1.
    ``latent_center`` and ``latent_scale`` calibrate it; the defaults give those clips r ≈ −0.8,
    +0.8, +2.3, and noise the clamp.

    The clamp keeps exp(β·r) bounded. Rewards at the clamp carry no information (every weight is
    exp(±β·limit)), so the first call whose rewards all sit there logs a warning naming the measured
    motion and the calibration to change.
    """

    needs_pixels = False  # also meaningful on latents (used when no VAE is given)

    def __init__(
        self,
        center: float = 0.03,
        scale: float = 0.02,
        latent_center: float = 0.4,
        latent_scale: float = 0.3,
        limit: float = 3.0,
        pool: int = 4,
    ) -> None:
        if scale <= 0 or latent_scale <= 0:
            raise ValueError(
                f"motion reward scale and latent_scale must be > 0, got {scale} and {latent_scale}"
            )
        if pool < 1:
            raise ValueError(f"motion reward pool must be >= 1, got {pool}")
        if limit <= 0:
            raise ValueError(f"motion reward limit must be > 0, got {limit}")
        self.center, self.scale, self.limit, self.pool = center, scale, limit, pool
        self.latent_center, self.latent_scale = latent_center, latent_scale
        self.warned = False

    def motion(self, frames: torch.Tensor) -> torch.Tensor:
        """Motion per sample [B] (float32): absolute for RGB frames, relative for latents."""
        if frames.ndim != 5 or frames.shape[1] < 2:
            raise ValueError(f"motion reward needs frames [B, T >= 2, C, H, W], got {list(frames.shape)}")
        x = frames.float()
        pixels = x.shape[2] == 3
        if pixels:
            x = (0.299 * x[:, :, 0] + 0.587 * x[:, :, 1] + 0.114 * x[:, :, 2]).unsqueeze(2)
        b, t, c, h, w = x.shape
        k = min(self.pool, h, w)
        x = F.avg_pool2d(x.reshape(b * t * c, 1, h, w), k).reshape(b, t, c, -1)
        change = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 3))  # [B, C]
        if pixels:
            return change[:, 0]
        spread = (x - x.mean(dim=(1, 3), keepdim=True)).abs().mean(dim=(1, 3))
        return (change / spread.clamp_min(1e-6)).mean(dim=1)

    def __call__(self, frames: torch.Tensor, prompts: Sequence[str] = ()) -> torch.Tensor:
        m = self.motion(frames)
        pixels = frames.shape[2] == 3
        center, scale = (self.center, self.scale) if pixels else (self.latent_center, self.latent_scale)
        r = (m - center) / scale
        if not self.warned and bool((r.abs() >= self.limit).all()):
            self.warned = True
            names = "center/scale" if pixels else "latent_center/latent_scale"
            log.warning(
                "motion reward at its clamp (±%g) for every sample (%s motion %s; %s %g/%g): the "
                "Re-DMD weights exp(beta * reward) then carry no information (plain DMD at a fixed "
                "scale); set the reward options %s around your rollouts' motion",
                self.limit,
                "frame" if pixels else "latent",
                ", ".join(f"{v:.3g}" for v in m.tolist()),
                names,
                center,
                scale,
                names,
            )
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


BUILT_IN_REWARDS = ("motion", "videoalign", "none")


def check_reward_kind(kind: str) -> None:
    """Refuse a kind that is neither a built-in reward nor an import path, naming the built-ins and
    the closest one (a typo such as "motoin" would otherwise read as a malformed import path)."""
    if kind in BUILT_IN_REWARDS or ":" in kind:
        return
    close = difflib.get_close_matches(kind, BUILT_IN_REWARDS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown reward {kind!r}: expected a built-in reward ({', '.join(BUILT_IN_REWARDS)}) or an "
        f"import path 'package.module:callable'{hint}"
    )


def build_reward(kind: str, options: dict | None = None, device: torch.device | str = "cpu") -> Reward | None:
    """The reward named by ``kind``: "none", "motion", "videoalign" or an import path. ``options``
    are keyword arguments of the reward (for an import path: of the callable if it is a class or
    factory, i.e. ``callable(**options)`` must return the reward; with no options the callable
    itself is the reward)."""
    options = dict(options or {})
    check_reward_kind(kind)
    if kind == "none":
        return None
    if kind == "motion":
        known = set(inspect.signature(MotionReward).parameters)
        if unknown := sorted(set(options) - known):
            raise ValueError(f"motion reward: unknown option(s) {unknown}; expected some of {sorted(known)}")
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
