"""Model presets and streaming settings.

Names follow the user's words (``sink_frames``, ``window_frames``...). Model fields follow Wan2.1's
``config.json`` so a real config maps one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

SINK_POLICIES = ("ema", "static", "none", "global")


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Wan2.1 DiT. ``head_dim`` is always 128 for real checkpoints."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 12:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 12 for the 3D RoPE split")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "patch_size" in known:
            known["patch_size"] = tuple(known["patch_size"])
        return cls(**known)


PRESETS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Small enough for CPU tests, still head_dim 128 so heads = dim / 128 holds as for real files.
    "tiny": DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, text_len=32),
}


def get_preset(name: str) -> DiTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class StreamConfig:
    """How a stream is generated.

    window_frames: latent frames attended per chunk, counting the sink and the current chunk (RF: 9).
    sink_frames: latent frames kept at the start of the window (RF: 3).
    sink_policy: "ema" (evicted frames blended into the sink with ``ema_alpha``), "static" (sink
        frozen), "none" (plain sliding window; sink_frames ignored), "global" (no eviction; the cache
        holds ``max_frames`` frames and the stream stops there).
    """

    chunk_frames: int = 3
    window_frames: int = 9
    sink_frames: int = 3
    sink_policy: str = "ema"
    ema_alpha: float = 0.999
    denoise_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp_steps: bool = True
    shift: float = 5.0
    context_timestep: float = 0.0
    max_frames: int = 21
    extras: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.sink_policy not in SINK_POLICIES:
            raise ValueError(f"unknown sink_policy {self.sink_policy!r}; expected one of {SINK_POLICIES}")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        if not self.denoise_steps:
            raise ValueError("denoise_steps must hold at least one timestep")
        if any(not 0 < t <= 1000 for t in self.denoise_steps):
            raise ValueError(f"denoise_steps must lie in (0, 1000], got {self.denoise_steps}")
        if any(a <= b for a, b in zip(self.denoise_steps, self.denoise_steps[1:])):
            raise ValueError(f"denoise_steps must go from high to low, got {self.denoise_steps}")
        if self.sink_policy == "global":
            if self.max_frames < self.chunk_frames:
                raise ValueError(f"max_frames {self.max_frames} < chunk_frames {self.chunk_frames}")
        else:
            if self.sink_frames < 0:
                raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
            need = self.effective_sink_frames + self.chunk_frames
            if self.window_frames < need:
                raise ValueError(
                    f"window_frames {self.window_frames} must be >= sink_frames + chunk_frames = {need}"
                )

    @property
    def effective_sink_frames(self) -> int:
        return 0 if self.sink_policy in ("none", "global") else self.sink_frames

    @property
    def cache_frames(self) -> int:
        return self.max_frames if self.sink_policy == "global" else self.window_frames

    def replace(self, **kw) -> StreamConfig:
        return replace(self, **kw)
