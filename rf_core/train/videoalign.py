"""VideoAlign's VideoReward model (Qwen2-VL-2B + a linear reward head) as a Re-DMD reward
(reference-algorithm.md §10). Needs the optional ``transformers`` package.

Checkpoint directory (``VideoReward`` or ``Videoreward``, §13.8)::

    model_config.json          data_config / model_config / peft_lora_config / inference_config
    checkpoint-<step>/         the newest is used
        model.pth              full state dict (peft-wrapped key names), or
        adapter_model.safetensors + non_lora_state_dict.pth   LoRA on the LLM + the other weights

The base Qwen2-VL (config, tokenizer, and weights for the LoRA variant) comes from
``model_config.model_name_or_path`` (a local folder or an already-cached Hugging Face id; nothing
is downloaded) or the ``base_model`` option.

Scoring (what the reward model was trained on, with the reference's input bug fixed):
- frames in [0, 1] are scaled to [0, 255] (the reference feeds 255·[−1, 1], §13.15), resized
  (bicubic, antialiased) to the Qwen2-VL grid: ``smart_resize`` with the config's
  ``max_frame_pixels`` (480×832 → 336×588, the reference's fixed size), clamped to [0, 255];
- sampled at the config's ``fps`` (2 fps: 10 of 81 frames at 16 fps), as VideoAlign reads videos;
  ``sample_fps=False`` keeps every frame like the reference's Re-DMD;
- rescaled by 1/255, normalised with the CLIP mean/std, cut into 2×14×14 patches in Qwen2-VL's
  order; the prompt is the ``detailed_special`` template (read from ``prompt_template.txt`` in the
  VideoReward folder: the user supplies VideoAlign's text) in Qwen2-VL's chat format;
- the LLM runs on the embeddings with sequential positions (``position_ids=None``, as VideoAlign
  was trained, §13.25); the reward head's outputs at the three special tokens are (VQ, MQ, TA),
  normalised with the config's means and stds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("VQ", "MQ", "TA")
# qwen-vl-utils constants for reading videos
PATCH, MERGE, TEMPORAL = 14, 2, 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
FPS_MIN_FRAMES, FPS_MAX_FRAMES = 4, 768
DEFAULT_MAX_FRAME_PIXELS = 200704
# VideoAlign's ``detailed_special`` prompt text is not shipped here (it is another project's prose):
# put it in the VideoReward folder under this name, or pass ``template=``.
TEMPLATE_NAME = "prompt_template.txt"
_DIR_NAMES = ("VideoReward", "Videoreward", "videoreward")


class VideoAlignError(ValueError):
    """A VideoReward directory or checkpoint that cannot be used; the message names the file."""


# ----------------------------------------------------------------------------- video preprocessing
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's size rule: multiples of ``factor``, pixel count within [min, max], aspect kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def sample_frame_indices(total: int, video_fps: float, target_fps: float) -> list[int]:
    """Frames VideoAlign reads from a ``total``-frame video at ``target_fps`` (qwen-vl-utils rule:
    an even count between 4 and 768, spread uniformly)."""
    n = round(total / video_fps * target_fps / TEMPORAL) * TEMPORAL
    lo = math.ceil(FPS_MIN_FRAMES / TEMPORAL) * TEMPORAL
    hi = math.floor(min(FPS_MAX_FRAMES, total) / TEMPORAL) * TEMPORAL
    n = max(min(n, hi), lo)
    if n > total:
        raise ValueError(f"VideoAlign needs at least {n} frames, got {total}")
    return torch.linspace(0, total - 1, n).round().long().tolist()


def video_to_patches(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 3, H, W] in [0, 255] (H, W multiples of 28) → (pixel_values [N, 3·2·14·14] float32,
    grid_thw [1, 3]) in Qwen2-VL's layout: frames padded to an even count by repeating the last,
    rescaled by 1/255, CLIP-normalised, then patches ordered (t, h-block, w-block, h-in, w-in) with
    features (channel, frame, row, col)."""
    t, c, h, w = video.shape
    if h % (PATCH * MERGE) or w % (PATCH * MERGE):
        raise ValueError(f"frame size {h}x{w} must be a multiple of {PATCH * MERGE}")
    x = video.float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if t % TEMPORAL:
        x = torch.cat([x, x[-1:].expand(TEMPORAL - t % TEMPORAL, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // TEMPORAL, h // PATCH, w // PATCH
    x = x.reshape(gt, TEMPORAL, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(gt * gh * gw, c * TEMPORAL * PATCH * PATCH)
    return patches, torch.tensor([[gt, gh, gw]])


# ----------------------------------------------------------------------------- checkpoint files
def find_reward_dir(path: str | Path) -> Path:
    """The directory holding model_config.json: ``path`` itself or its VideoReward subfolder."""
    path = Path(path)
    for cand in (path, *(path / n for n in _DIR_NAMES)):
        if (cand / "model_config.json").is_file():
            return cand
    raise VideoAlignError(
        f"{path}: no model_config.json here or in a {'/'.join(_DIR_NAMES)} subfolder "
        f"(download KwaiVGI/VideoReward and point reward.options.path at it)"
    )


def latest_checkpoint_dir(folder: Path) -> Path:
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    if not found:
        raise VideoAlignError(f"{folder}: no checkpoint-<step> folder")
    return max(found)[1]


def _target_name(key: str, new_layout: bool) -> str | None:
    """A VideoReward checkpoint key (peft-wrapped, old or new transformers module names) → the
    installed transformers' Qwen2VLForConditionalGeneration name (or ``rm_head.weight``); None = drop.
    Old transformers: ``model.*`` = LLM, ``visual.*``; new: ``model.language_model.*``, ``model.visual.*``."""
    k = key.removeprefix("base_model.model.")
    if ".original_module." in k:
        return None
    k = k.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
    for prefix, part in (
        ("model.visual.", "visual"),
        ("visual.", "visual"),
        ("model.language_model.", "llm"),
        ("model.", "llm"),
    ):
        if k.startswith(prefix):
            rest = k[len(prefix) :]
            if new_layout:
                return ("model.visual." if part == "visual" else "model.language_model.") + rest
            return ("visual." if part == "visual" else "model.") + rest
    return k


def _lora_role(key: str) -> tuple[str, str] | None:
    """(module key, "A"|"B") for peft LoRA factors (with or without the adapter name)."""
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
    return (m.group(1), m.group(2)) if m else None


def convert_checkpoint(
    state: dict[str, torch.Tensor], new_layout: bool, lora_scale: float, source: str
) -> dict[str, torch.Tensor]:
    """VideoReward state dict → plain weights: names mapped, peft LoRA factors merged into their
    base weights (W + scale·B·A)."""
    out: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        role = _lora_role(key)
        if role is not None:
            factors.setdefault(role[0], {})[role[1]] = value
            continue
        name = _target_name(key, new_layout)
        if name is not None:
            out[name] = value
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise VideoAlignError(f"{source}: LoRA of {module!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        name = _target_name(module + ".weight", new_layout)
        if name not in out:
            raise VideoAlignError(
                f"{source}: LoRA for {module!r} but no base weight {module}.base_layer.weight"
            )
        w = out[name]
        out[name] = (w.float() + lora_scale * (ab["B"].float() @ ab["A"].float())).to(w.dtype)
    return out


def read_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint-<step> folder (full ``model.pth``, or LoRA adapter + non-LoRA state)."""
    full = ckpt / "model.pth"
    if full.is_file():
        return torch.load(full, map_location="cpu", weights_only=True)
    adapter, rest = ckpt / "adapter_model.safetensors", ckpt / "non_lora_state_dict.pth"
    if not (adapter.is_file() and rest.is_file()):
        raise VideoAlignError(
            f"{ckpt}: neither model.pth nor adapter_model.safetensors + non_lora_state_dict.pth"
        )
    from safetensors.torch import load_file

    state = dict(torch.load(rest, map_location="cpu", weights_only=True))
    state.update(load_file(str(adapter)))
    return state


def lora_scale(peft_config: dict) -> float:
    r = peft_config.get("lora_r", 0) or 0
    alpha = peft_config.get("lora_alpha", r)
    if not r:
        return 1.0
    return alpha / math.sqrt(r) if peft_config.get("use_rslora") else alpha / r


def _chat_template(base: str) -> str:
    """Qwen2-VL keeps its vision-aware chat template next to the processor config."""
    from transformers.utils import cached_file

    for name in ("chat_template.json", "chat_template.jinja"):
        path = cached_file(base, name, local_files_only=True, _raise_exceptions_for_missing_entries=False)
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise VideoAlignError(
        f"{base}: the tokenizer has no chat template and no chat_template.json/.jinja was found"
    )


# ----------------------------------------------------------------------------- the reward
class VideoAlignReward:
    """``reward(frames [B, T, 3, H, W] in [0, 1], prompts) -> [B]``: one VideoReward dimension
    (default MQ, as Re-DMD uses), or "Overall" = the mean of the three."""

    needs_pixels = True

    def __init__(
        self,
        model,
        rm_head: torch.nn.Linear,
        tokenizer,
        config: dict,
        dimension: str = "MQ",
        use_norm: bool = True,
        sample_fps: bool = True,
        video_fps: float = 16.0,
        resolution: Sequence[int] | str = "auto",
        template: str = "",
    ) -> None:
        if dimension not in (*DIMENSIONS, "Overall"):
            raise ValueError(
                f"VideoAlign dimension must be one of {(*DIMENSIONS, 'Overall')}, got {dimension!r}"
            )
        self.model, self.rm_head, self.tokenizer = model, rm_head, tokenizer
        self.data_config = config.get("data_config", {})
        self.norm = config.get("inference_config") or {}
        if use_norm and not all(f"{d}_{s}" in self.norm for d in DIMENSIONS for s in ("mean", "std")):
            raise VideoAlignError(
                "model_config.json has no inference_config with VQ/MQ/TA means and stds (use_norm)"
            )
        self.dimension, self.use_norm = dimension, use_norm
        self.sample_fps, self.video_fps = sample_fps, video_fps
        self.resolution = resolution
        if "{text_prompt}" not in template:
            raise VideoAlignError(
                "the VideoAlign prompt template (its 'detailed_special' text, with a {text_prompt} slot) is "
                f"needed: save it as {TEMPLATE_NAME} in the VideoReward folder or pass template="
            )
        self.template = template
        self.reward_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        self.video_token_id = model.config.video_token_id

    # .......................................................................... loading
    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype = "auto",
        base_model: str | None = None,
        attn_implementation: str = "sdpa",
        **options,
    ) -> VideoAlignReward:
        try:
            from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
        except ImportError as err:
            raise ImportError(
                "the VideoAlign reward needs the 'transformers' package (pip install 'transformers>=4.45')"
            ) from err
        folder = find_reward_dir(path)
        config = json.loads((folder / "model_config.json").read_text(encoding="utf-8"))
        model_cfg = config.get("model_config", {})
        base = base_model or model_cfg.get("model_name_or_path")
        if not base:
            raise VideoAlignError(f"{folder}/model_config.json: model_config.model_name_or_path is missing")
        template_type = config.get("data_config", {}).get("prompt_template_type", "detailed_special")
        if template_type != "detailed_special" or not model_cfg.get("use_special_tokens", True):
            raise VideoAlignError(
                f"{folder}: only the 'detailed_special' prompt with reward tokens (VideoReward's setting) is "
                f"supported, the config has prompt_template_type={template_type!r}"
            )
        device = torch.device(device)
        if dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
            model = Qwen2VLForConditionalGeneration.from_pretrained(
                base, torch_dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
            )
        except OSError as err:
            raise VideoAlignError(
                f"cannot load the base Qwen2-VL {base!r} from local files (nothing is downloaded): give "
                f"reward.options.base_model = a local Qwen2-VL-2B-Instruct folder ({err})"
            ) from err
        if tokenizer.chat_template is None:
            tokenizer.chat_template = _chat_template(base)
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        model.resize_token_embeddings(len(tokenizer))
        hidden = model.config.get_text_config().hidden_size
        rm_head = torch.nn.Linear(hidden, int(model_cfg.get("output_dim", 1)), bias=False)
        ckpt = latest_checkpoint_dir(folder)
        state = read_checkpoint(ckpt)
        new_layout = any(k.startswith("model.language_model.") for k in model.state_dict())
        weights = convert_checkpoint(
            state, new_layout, lora_scale(config.get("peft_lora_config", {})), str(ckpt)
        )
        head = weights.pop("rm_head.weight", None)
        if head is None:
            raise VideoAlignError(f"{ckpt}: no rm_head weight (base_model.model.rm_head.weight)")
        rm_head.weight.data.copy_(head)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings in Qwen2-VL-2B
        if missing or unexpected:
            raise VideoAlignError(
                f"{ckpt}: weights do not fit the base model {base!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.to(device, dtype).eval().requires_grad_(False)
        rm_head.to(device, dtype).eval().requires_grad_(False)
        if "template" not in options:
            tfile = folder / TEMPLATE_NAME
            if not tfile.is_file():
                raise VideoAlignError(
                    f"{tfile} is missing: save VideoAlign's 'detailed_special' prompt template text there "
                    "(it is the prompt the reward model was trained with; it is not shipped with this package)"
                )
            options["template"] = tfile.read_text(encoding="utf-8")
        return cls(model, rm_head, tokenizer, config, **options)

    # .......................................................................... inputs
    def _size(self, height: int, width: int) -> tuple[int, int]:
        if self.resolution != "auto":
            h, w = self.resolution
            return int(h), int(w)
        max_pixels = int(self.data_config.get("max_frame_pixels") or DEFAULT_MAX_FRAME_PIXELS)
        return smart_resize(height, width, PATCH * MERGE, VIDEO_MIN_PIXELS, max_pixels)

    def prepare(self, frames: torch.Tensor, prompt: str) -> dict[str, torch.Tensor]:
        """Model inputs for one video [T, 3, H, W] in [0, 1]: input_ids [1, L], pixel_values_videos,
        video_grid_thw."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"VideoAlign expects frames [T, 3, H, W], got {list(frames.shape)}")
        if self.sample_fps:
            fps = float(self.data_config.get("fps") or 2.0)
            frames = frames[sample_frame_indices(frames.shape[0], self.video_fps, fps)]
        h, w = self._size(*frames.shape[-2:])
        video = F.interpolate(
            frames.float() * 255.0, size=(h, w), mode="bicubic", antialias=True, align_corners=False
        )
        pixels, grid = video_to_patches(video.clamp_(0.0, 255.0))
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "video"},
                    {"type": "text", "text": self.template.replace("{text_prompt}", prompt)},
                ],
            }
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pad = self.tokenizer.convert_ids_to_tokens(self.video_token_id)
        if text.count(pad) != 1:
            raise VideoAlignError(
                f"the chat template must place one {pad} for the video, got {text.count(pad)}"
            )
        n = int(grid.prod()) // (MERGE * MERGE)
        ids = self.tokenizer(
            text.replace(pad, pad * n), add_special_tokens=False, return_tensors="pt"
        ).input_ids
        return {"input_ids": ids, "pixel_values_videos": pixels, "video_grid_thw": grid}

    # .......................................................................... scoring
    @torch.no_grad()
    def scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw (VQ, MQ, TA) [3] of one prepared video."""
        model = self.model
        inner = model.model
        visual, lm = (
            (inner.visual, inner.language_model)
            if hasattr(inner, "language_model")
            else (model.visual, inner)
        )
        dev = self.rm_head.weight.device
        ids = inputs["input_ids"].to(dev)
        embeds = model.get_input_embeddings()(ids)
        pixels = inputs["pixel_values_videos"].to(dev, next(visual.parameters()).dtype)
        vis = visual(pixels, grid_thw=inputs["video_grid_thw"].to(dev))
        vis = getattr(vis, "pooler_output", vis)  # transformers 5 wraps the merged features
        mask = (ids == self.video_token_id).unsqueeze(-1).expand_as(embeds)
        if mask[..., 0].sum() != vis.shape[0]:
            raise VideoAlignError(f"{int(mask[..., 0].sum())} video tokens but {vis.shape[0]} video features")
        embeds = embeds.masked_scatter(mask, vis.to(embeds.dtype))
        hidden = lm(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids), position_ids=None
        ).last_hidden_state
        special = torch.zeros_like(ids, dtype=torch.bool)
        for tid in self.reward_ids:
            special |= ids == tid
        if int(special.sum()) != len(REWARD_TOKENS):
            raise VideoAlignError(
                f"expected {len(REWARD_TOKENS)} reward tokens in the prompt, found {int(special.sum())}"
            )
        logits = self.rm_head(hidden[special])  # [3, output_dim], in VQ, MQ, TA order
        if logits.shape[-1] == len(REWARD_TOKENS):
            logits = logits.diagonal()[:, None]
        return logits[:, 0].float()

    def normalized(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, d in enumerate(DIMENSIONS):
            out[d] = (
                (raw[..., i] - self.norm[f"{d}_mean"]) / self.norm[f"{d}_std"]
                if self.use_norm
                else raw[..., i]
            )
        out["Overall"] = (out["VQ"] + out["MQ"] + out["TA"]) / 3
        return out

    def __call__(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if frames.ndim != 5:
            raise ValueError(f"VideoAlign expects frames [B, T, 3, H, W], got {list(frames.shape)}")
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {frames.shape[0]} videos")
        raw = torch.stack([self.scores(self.prepare(f, p)) for f, p in zip(frames, prompts)])
        return self.normalized(raw)[self.dimension]
