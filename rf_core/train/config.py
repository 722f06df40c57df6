"""Training configuration: dataclasses with the paper's hyper-parameters as defaults, read from
YAML or TOML (configs/train_default.yaml documents every field)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rf_core.config import PRESETS
from rf_core.model.attention import BACKENDS
from rf_core.model.dit import WanDiT
from rf_core.text.embeddings import WAN_NEGATIVE_PROMPT
from rf_core.train.lora_train import DEFAULT_TARGETS, matches
from rf_core.train.rewards import check_reward_kind
from rf_core.train.rollout import training_stream_config


@dataclass
class ModelConfig:
    student: str = ""  # student checkpoint (rewardforcing.pt, a converted file, or a Wan DiT)
    teacher: str = ""  # teacher (real score): Wan2.1-T2V-14B in the paper, or the 1.3B
    critic: str = "teacher"  # critic init: "teacher", "student" or a checkpoint path
    vae: str = ""  # Wan 2.1 VAE, needed by rewards on decoded frames
    random_preset: str = ""  # "tiny"/"wan2.1-t2v-1.3b": random weights instead of files (tests, benchmarks)
    attn_backend: str = "auto"


@dataclass
class DataConfig:
    # rf_core.text embedding file; every entry except `negative_entry` is a training prompt
    prompt_embeddings: str = ""
    negative_entry: str = "negative"
    # or: a text file with one prompt per line, encoded on the fly by the umT5 encoder (large lists)
    prompts: str = ""
    text_encoder: str = ""  # umT5-XXL checkpoint (models_t5_umt5-xxl-enc-bf16.pth or a ComfyUI file)
    tokenizer: str = ""  # umT5 tokenizer.json (or its folder)
    negative_prompt: str = WAN_NEGATIVE_PROMPT


@dataclass
class VideoConfig:
    frames: int = 21  # latent frames per rollout (7 chunks = 81 video frames)
    # the last grad_frames latent frames of a rollout get gradients and are scored by the teacher,
    # critic and reward; earlier chunks are generated without gradients (the reference's 21)
    grad_frames: int = 21
    height: int = 480
    width: int = 832
    denoise_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    chunk_frames: int = 3
    sink_frames: int = 3
    window_frames: int = 9


@dataclass
class LossConfig:
    beta: float = 2.0  # reward weight exp(beta * r); 0 = plain DMD
    guidance_scale: float = 3.0  # teacher x_c + s (x_c - x_u)
    timestep_shift: float = 5.0
    min_timestep: float = 20.0
    max_timestep: float = 980.0


@dataclass
class RewardConfig:
    kind: str = "videoalign"  # "videoalign", "motion", "none" or "package.module:callable"
    options: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 2.0e-6
    lr_critic: float = 4.0e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1.0e-8
    grad_clip: float = 10.0
    batch_size: int = 1  # per process
    gradient_accumulation: int = 8
    critic_steps_per_generator: int = 5
    ema_decay: float = 0.99
    ema_start_step: int = 200
    ema_on_cpu: bool = True


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 32
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    critic: bool = False  # also train the critic through LoRA (else the critic is trained in full)


@dataclass
class RunConfig:
    steps: int = 600  # critic optimiser steps; the generator steps every critic_steps_per_generator
    seed: int = 0
    output_dir: str = "runs/redmd"
    output_name: str = "redmd"
    save_every: int = 50
    keep_checkpoints: int = 2
    mixed_precision: str = "bf16"  # "bf16" (CUDA autocast) or "fp32"; CPU always runs fp32
    gradient_checkpointing: bool = True
    # weights written at the end: "ema" (raw weights if the run ends before ema_start_step) or "raw"
    export: str = "ema"
    tensorboard: bool = False
    device: str = ""  # "" = cuda if available


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        v, o, r = self.video, self.optim, self.run
        if min(v.height, v.width) < 16 or v.height % 16 or v.width % 16:
            raise ValueError(f"video.height/width must be positive multiples of 16, got {v.height}x{v.width}")
        if v.chunk_frames < 1:
            raise ValueError(f"video.chunk_frames must be >= 1, got {v.chunk_frames}")
        if v.frames <= 0 or v.frames % v.chunk_frames:
            raise ValueError(
                f"video.frames {v.frames} must be a positive multiple of chunk_frames {v.chunk_frames}"
            )
        if v.grad_frames <= 0 or v.grad_frames % v.chunk_frames:
            raise ValueError(
                f"video.grad_frames {v.grad_frames} must be a positive multiple of chunk_frames {v.chunk_frames}"
            )
        for name in ("batch_size", "gradient_accumulation", "critic_steps_per_generator"):
            if getattr(o, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(o, name)}")
        if r.mixed_precision not in ("bf16", "fp32"):
            raise ValueError(f"run.mixed_precision must be 'bf16' or 'fp32', got {r.mixed_precision!r}")
        if r.export not in ("ema", "raw"):
            raise ValueError(f"run.export must be 'ema' or 'raw', got {r.export!r}")
        if r.save_every < 1 or r.steps < 1:
            raise ValueError(f"run.steps and run.save_every must be >= 1, got {r.steps} and {r.save_every}")
        if r.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints must be >= 1, got {r.keep_checkpoints}")
        if not r.output_name or Path(r.output_name).name != r.output_name or r.output_name in (".", ".."):
            raise ValueError(
                f"run.output_name must be a file name without folders (they go in run.output_dir), "
                f"got {r.output_name!r}"
            )
        self._check_numbers()
        try:
            training_stream_config(
                v.denoise_steps, self.loss.timestep_shift, v.chunk_frames, v.sink_frames, v.window_frames
            )
        except ValueError as err:
            raise ValueError(f"video: {err}") from None
        if self.model.random_preset and self.model.random_preset not in PRESETS:
            raise ValueError(
                f"model.random_preset {self.model.random_preset!r} is not a preset; expected one of {sorted(PRESETS)}"
            )
        if self.model.attn_backend not in BACKENDS:
            raise ValueError(f"model.attn_backend must be one of {BACKENDS}, got {self.model.attn_backend!r}")
        if self.lora.enabled:
            with torch.device("meta"):  # the layer names of every Wan DiT, whatever its size
                names = [
                    n for n, m in WanDiT(PRESETS["tiny"]).named_modules() if isinstance(m, torch.nn.Linear)
                ]
            if not any(matches(n, self.lora.targets) for n in names):
                raise ValueError(
                    f"lora.targets {list(self.lora.targets)} match no linear layer of the DiT "
                    f"(e.g. {', '.join(DEFAULT_TARGETS[:3])})"
                )
        try:
            check_reward_kind(self.reward.kind)
        except ValueError as err:
            raise ValueError(f"reward.kind: {err}") from None

    def _check_numbers(self) -> None:
        """Ranges of the optimiser, loss and LoRA numbers (finiteness is checked when they are read)."""
        o, loss, lora = self.optim, self.loss, self.lora
        ranges = [
            ("optim.lr", o.lr, o.lr >= 0, ">= 0"),  # 0 holds a model still (tests, ablations)
            ("optim.lr_critic", o.lr_critic, o.lr_critic >= 0, ">= 0"),
            (
                "optim.betas",
                o.betas,
                len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
                "two numbers in [0, 1)",
            ),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
            ("optim.eps", o.eps, o.eps > 0, "> 0"),
            ("optim.grad_clip", o.grad_clip, o.grad_clip > 0, "> 0"),
            ("optim.ema_decay", o.ema_decay, 0 <= o.ema_decay <= 1, "in [0, 1]"),
            ("optim.ema_start_step", o.ema_start_step, o.ema_start_step >= 0, ">= 0"),
            ("loss.guidance_scale", loss.guidance_scale, loss.guidance_scale >= 0, ">= 0"),
            ("loss.timestep_shift", loss.timestep_shift, loss.timestep_shift > 0, "> 0"),
            (
                "loss.min_timestep / max_timestep",
                (loss.min_timestep, loss.max_timestep),
                0 <= loss.min_timestep < loss.max_timestep <= 1000,
                "0 <= min < max <= 1000",
            ),
            ("lora.rank", lora.rank, lora.rank >= 1, ">= 1"),
            ("lora.alpha", lora.alpha, lora.alpha > 0, "> 0"),
        ]
        for key, value, ok, expected in ranges:
            if not ok:
                raise ValueError(f"{key} must be {expected}, got {value}")

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.video.height // 8, self.video.width // 8

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        sections = {}
        for key, value in (d or {}).items():
            if key not in cls.__dataclass_fields__:
                raise ValueError(
                    f"{source}: unknown section {key!r}; expected one of {sorted(cls.__dataclass_fields__)}"
                )
            sections[key] = _build(cls.__dataclass_fields__[key].default_factory, value, f"{source}: {key}")
        try:
            return cls(**sections)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def _build(section_cls, value, where: str):
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    kwargs = {}
    for k, v in value.items():
        if k not in fields:
            raise ValueError(f"{where}: unknown key {k!r}; expected one of {sorted(fields)}")
        default = getattr(section_cls(), k)
        if isinstance(default, tuple):
            if not isinstance(v, list | tuple):
                raise ValueError(f"{where}.{k} must be a list, got {v!r}")
            kind = type(default[0]) if default else None
            v = tuple(_number(x, f"{where}.{k}[{i}]") if kind is float else x for i, x in enumerate(v))
            if kind is str and not all(isinstance(x, str) for x in v):
                raise ValueError(f"{where}.{k} must be a list of strings, got {list(v)!r}")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{where}.{k} must be true or false, got {v!r}")
        elif isinstance(default, float):
            v = _number(v, f"{where}.{k}")
        elif not isinstance(v, type(default)) or isinstance(v, bool):
            kind = {int: "a whole number", float: "a number", str: "a string", dict: "a mapping"}.get(
                type(default), type(default).__name__
            )
            raise ValueError(f"{where}.{k} must be {kind}, got {v!r}")
        kwargs[k] = v
    return section_cls(**kwargs)


def _number(v, where: str) -> float:
    """A finite number; YAML 1.1 reads "2e-6" (no dot) as a string, so numeric strings count."""
    try:
        if isinstance(v, bool):
            raise ValueError
        number = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {v!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number, got {v!r}")
    return number


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) training config; ``overrides`` maps dotted keys
    ("run.steps") to values applied on top."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from e
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    else:
        raise ValueError(f"{path}: training config must be .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected sections (model:, video:, run: ...), got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"override {dotted!r} must look like 'section.key'")
        if not isinstance(data.setdefault(section, {}), dict):
            raise ValueError(f"{path}: {section} must be a mapping, got {data[section]!r}")
        data[section][key] = value
    return TrainConfig.from_dict(data, source=str(path))
