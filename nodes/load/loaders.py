"""Nodes that load files: the causal DiT, a LoRA on it, and our streaming decoders."""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from rf_core.config import PRESETS
from rf_core.io.formats import looks_like_lora
from rf_core.io.safe_load import CheckpointError, read_tensor_file
from rf_core.model.attention import BACKENDS
from rf_core.profiles import PROFILES

from .. import comfy
from ..common import CATEGORY, has_triton
from ..model_handle import Managed, RFDecoder, RFModel

comfy.register_model_folder()

MODEL_FOLDERS = ("diffusion_models", comfy.MODEL_FOLDER)
DECODER_FOLDERS = ("vae_approx", "vae")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP8 = "fp8_e4m3fn"
SPEEDS = ("fast", "reference")

# Loaded files by (path, mtime, options), held weakly: a loader node that runs again (e.g. after
# another workflow evicted ComfyUI's output cache) gets the very same weights back while anything,
# such as a live session, still uses them, so nothing is loaded twice and sessions carry on.
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _source(path: str, *options) -> tuple:
    return (os.path.realpath(path), os.path.getmtime(path), *options)


def _auto_dtype(device: torch.device) -> torch.dtype:
    mm = comfy.module("comfy.model_management")
    if device.type == "cpu" or mm is None:
        return torch.float32
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


def _named(err: Exception, path: str, name: str) -> str:
    """The error's message naming the file as the node lists it, not by its full path."""
    text = str(err)
    for full in sorted({path, str(Path(path)), os.path.realpath(path)}, key=len, reverse=True):
        text = text.replace(full, name)
    return text


def _file_keys(path: str) -> list[str] | None:
    """Every tensor key of a checkpoint (nested ones joined with '.'), or None if the file itself
    cannot be read (truncated, corrupt, not a checkpoint)."""
    try:
        tree, _ = read_tensor_file(path)
    except CheckpointError:
        return None
    keys: list[str] = []

    def walk(node: Mapping, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                keys.append(f"{prefix}{k}")

    walk(tree, "")
    return keys


# Files that are not a Wan2.1 text-to-video DiT, told apart by their keys: (test, what it is, what
# to do with it). Checked in this order: an image-to-video Wan also has the text-to-video keys.
_OTHER_KINDS = (
    (
        looks_like_lora,
        "a LoRA",
        "load the base model here, then apply the LoRA with Reward Forcing: LoRA (models/loras)",
    ),
    (
        lambda keys: any("img_emb." in k for k in keys),
        "a Wan image-to-video model",
        "Reward Forcing streams text to video: pick the causal text-to-video student (e.g. rewardforcing.pt)",
    ),
    (
        lambda keys: any(k.startswith(("decoder.head.", "decoder.upsamples.")) for k in keys),
        "a Wan 2.1 VAE",
        "load it with Load VAE or Reward Forcing: Load Decoder (models/vae) and connect it to the generator",
    ),
    (
        lambda keys: any(re.match(r"decoder\.\d+\.", k) for k in keys),
        "a TAEHV decoder",
        "load it with Reward Forcing: Load Decoder (models/vae_approx) and connect it to the generator",
    ),
    (
        lambda keys: any(
            k.startswith(("encoder.block.", "shared.", "text_model.", "token_embd.")) for k in keys
        ),
        "a text encoder",
        "load it with Load CLIP (type wan, models/text_encoders) and connect CLIP Text Encode to positive",
    ),
    (
        lambda keys: any(m in k for k in keys for m in ("input_blocks.", "double_blocks.", "joint_blocks.")),
        "a diffusion model of another family (Stable Diffusion, SD3 or Flux)",
        "pick the causal Wan2.1 text-to-video student (e.g. rewardforcing.pt)",
    ),
)


def _model_file_error(err: CheckpointError, path: str, name: str) -> str:
    """Why a model file did not load. The cause comes first; what to pick instead only where the file
    is another kind of model file (a damaged file says so and nothing else)."""
    keys = _file_keys(path)
    for test, what, advice in _OTHER_KINDS if keys else ():
        if test(keys):
            return f"{name} is {what}, not a Wan2.1 text-to-video diffusion model: {advice}"
    return _named(err, path, name)


def _size_name(dim: int) -> str:
    """A DiT width with the preset it belongs to, e.g. "1536 wide (wan2.1-t2v-1.3b)"."""
    presets = [n for n, cfg in PRESETS.items() if cfg.dim == dim]
    return f"{dim} wide ({presets[0]})" if presets else f"{dim} wide"


def _lora_size(lora) -> str:
    """The DiT a LoRA was made for, as far as its layers tell: width and number of blocks."""
    widths, blocks = set(), set()
    for module, layer in lora.layers.items():
        block = re.match(r"blocks\.(\d+)\.", module)
        if block is None:
            continue
        blocks.add(int(block[1]))
        delta = layer.up if layer.up is not None else layer.diff
        if re.fullmatch(r"blocks\.\d+\.(self|cross)_attn\.[qkvo]", module) and delta is not None:
            widths.add(delta.shape[0])  # attention projections map the width to itself
    parts = [" or ".join(_size_name(w) for w in sorted(widths))] if widths else []
    if blocks:
        parts.append(f"at least {max(blocks) + 1} blocks")
    return " with ".join(parts) or "another model"


def _lora_mismatch(err: Exception, lora, lora_name: str, model: RFModel) -> str:
    cfg = model.cfg
    detail = str(err).removeprefix(f"{lora_name}: ")
    return (
        f"{lora_name} does not fit {model.name}: the LoRA was made for a DiT {_lora_size(lora)}, this one is "
        f"{_size_name(cfg.dim)} with {cfg.num_layers} blocks ({detail}). Pick a LoRA trained for this model"
    )


def _pick_device(placement: str) -> tuple[torch.device, torch.device, bool]:
    """(compute device, device the weights wait on, managed by ComfyUI?)"""
    if placement == "cpu":
        cpu = torch.device("cpu")
        return cpu, cpu, False
    return comfy.torch_device(), comfy.offload_device(), True


class RewardForcingLoadModel:
    DESCRIPTION = "Load a causal Wan2.1 text-to-video student (Reward Forcing, Self-Forcing, LongLive...)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("RF_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The streaming model, for Stream Generate / Stream Session.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (
                    comfy.filename_list(*MODEL_FOLDERS),
                    {
                        "tooltip": "Checkpoint from models/diffusion_models or models/reward_forcing "
                        "(e.g. rewardforcing.pt, a Self-Forcing .pt, or a Wan .safetensors)."
                    },
                ),
                "dtype": (
                    ["auto", "bf16", "fp16", "fp32", FP8],
                    {
                        "default": "auto",
                        "tooltip": "Weight precision. auto: bf16 where the GPU supports it, else fp16; fp32 on "
                        "CPU. fp8_e4m3fn stores the block weights in 8 bits (half the memory) and computes in bf16.",
                    },
                ),
                "attention": (
                    list(BACKENDS),
                    {
                        "default": "auto",
                        "tooltip": "Attention kernel. auto: FlashAttention 3/2 when installed, else PyTorch SDPA.",
                    },
                ),
                "placement": (
                    ["auto", "cpu"],
                    {
                        "default": "auto",
                        "tooltip": "auto: ComfyUI moves the model to the GPU when it runs and offloads it when "
                        "other models need the memory. cpu: keep and run it on the CPU (slow; for testing).",
                    },
                ),
            },
            "optional": {
                "speed": (
                    list(SPEEDS),
                    {
                        "default": "fast",
                        "tooltip": "fast: compiled blocks (when Triton is installed; the first chunk then takes "
                        "about a minute once), keys cached roped, CUDA graphs: about 2x the reference's speed, "
                        "same results within bf16 rounding. reference: the reference's exact arithmetic.",
                    },
                ),
                "profile": (
                    list(PROFILES),
                    {
                        "default": "quality",
                        "tooltip": "quality: the bf16 path above, placed by ComfyUI. low-vram: block weights "
                        "stored in fp8 and streamed from host memory block by block (for 8-16 GB cards; "
                        "output within about 5% of quality; no CUDA graphs, no LoRA). turbo: quantised "
                        "attention (sageattention) and fp8 GEMMs (torchao), opt-in, output within about 5% "
                        "of quality. low-vram and turbo keep the model where they put it (outside ComfyUI's "
                        "memory manager) and need speed fast. docs/benchmarks.md has the measured figures.",
                    },
                ),
            },
        }

    def load(
        self,
        model_name: str,
        dtype: str = "auto",
        attention: str = "auto",
        placement: str = "auto",
        speed: str = "fast",
        profile: str = "quality",
    ):
        from rf_core.io.checkpoints import load_dit

        path = comfy.full_path(MODEL_FOLDERS, model_name)
        if speed not in SPEEDS:
            raise ValueError(f"speed must be one of {list(SPEEDS)}, got {speed!r}")
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {list(PROFILES)}, got {profile!r}")
        if profile != "quality" and (speed != "fast" or dtype == FP8 or placement == "cpu"):
            raise ValueError(
                f"profile {profile} needs speed fast, a dtype other than {FP8} (it chooses its own weight "
                f"storage) and placement auto; got speed {speed}, dtype {dtype}, placement {placement}"
            )
        source = _source(path, "dit", dtype, attention, placement, speed, profile)
        cached = _LOADED.get(source)
        if cached is not None:
            return (cached,)
        compute, wait_on, managed = _pick_device(placement)
        if dtype == "auto":
            weight_dtype = _auto_dtype(compute)
        elif dtype == FP8:
            weight_dtype = torch.bfloat16 if compute.type != "cpu" else torch.float32
        else:
            weight_dtype = DTYPES[dtype]
        try:
            dit = load_dit(path, device=wait_on, dtype=weight_dtype, attn_backend=attention)
        except CheckpointError as err:
            raise ValueError(_model_file_error(err, path, model_name)) from err
        if dtype == FP8:
            from rf_core.model.fp8 import store_linears_fp8

            store_linears_fp8(dit)
        cuda = compute.type == "cuda"
        if profile != "quality":
            from rf_core.profiles import apply_profile

            # Offloaded blocks and quantised kernels stay where the profile put them: ComfyUI moving
            # the model as a whole would undo them.
            apply_profile(dit, profile, compute, compile=cuda and has_triton())
            managed = False
        elif speed == "fast":
            from rf_core.speed import make_fast

            make_fast(dit, compile=cuda and has_triton(), cuda_graphs=cuda)
        handle = RFModel(Managed.wrap(dit, managed), model_name, source)
        _LOADED[source] = handle
        return (handle,)


class RewardForcingLoRA:
    DESCRIPTION = "Apply a LoRA to a Reward Forcing model (the loaded model itself is not changed)."
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("RF_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("RF_MODEL", {"tooltip": "Model from Load Model (or another LoRA node)."}),
                "lora_name": (
                    comfy.filename_list("loras"),
                    {"tooltip": "LoRA file from models/loras (PEFT, kohya or ComfyUI key names for Wan)."},
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "Scale of the LoRA update; 0 leaves the model as it is.",
                    },
                ),
            }
        }

    def apply(self, model: RFModel, lora_name: str, strength: float = 1.0):
        from rf_core.lora import LoraError, load_lora

        if not isinstance(model, RFModel):
            raise ValueError(f"model: expected an RF_MODEL from Load Model, got {type(model).__name__}")
        path = comfy.full_path(("loras",), lora_name)
        try:
            lora = load_lora(path)
        except CheckpointError as err:
            if _file_keys(path) is None:  # a damaged file: that is the whole story
                raise ValueError(_named(err, path, lora_name)) from err
            cause = _named(err, path, lora_name).removeprefix(f"{lora_name}: ")
            raise ValueError(f"{lora_name} is not a LoRA for a Wan2.1 DiT: {cause}") from err
        lora.source = lora_name  # the engine's errors name the file as the node lists it
        try:
            return (model.with_lora(lora, lora_name, strength),)
        except LoraError as err:
            raise ValueError(_lora_mismatch(err, lora, lora_name, model)) from err


class RewardForcingLoadDecoder:
    DESCRIPTION = (
        "Load a streaming video decoder: the Wan 2.1 VAE (exact, slower) or TAEHV (taew2_1, tiny and fast). "
        "For ComfyUI's own VAE object use Load VAE instead; both plug into the generators."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("RF_DECODER",)
    RETURN_NAMES = ("decoder",)
    OUTPUT_TOOLTIPS = ("Decoder for Stream Generate / Stream Session / Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "decoder_name": (
                    comfy.filename_list(*DECODER_FOLDERS),
                    {"tooltip": "taew2_1.pth (models/vae_approx) or wan_2.1_vae.safetensors (models/vae)."},
                ),
                "dtype": (
                    ["auto", "bf16", "fp16", "fp32"],
                    {
                        "default": "auto",
                        "tooltip": "Decoder precision. auto: ComfyUI's VAE precision; fp32 on CPU.",
                    },
                ),
            },
            "optional": {
                "speed": (
                    list(SPEEDS),
                    {
                        "default": "fast",
                        "tooltip": "fast: the Wan VAE decoder compiled, channels-last, with sub-pixel upsampling "
                        "(on CUDA with Triton; the first chunk then takes about half a minute once): about "
                        "1.9x the reference decoder (114 vs 211 ms per 12 frames on an H100), same frames "
                        "within bf16 rounding. reference: the reference's exact arithmetic. TAEHV is the same "
                        "either way.",
                    },
                ),
            },
        }

    def load(self, decoder_name: str, dtype: str = "auto", speed: str = "fast"):
        from rf_core.io.safe_load import read_state_dict
        from rf_core.vae.taehv import taehv_from_state_dict
        from rf_core.vae.wan_vae import wan_vae_from_state_dict

        path = comfy.full_path(DECODER_FOLDERS, decoder_name)
        if speed not in SPEEDS:
            raise ValueError(f"speed must be one of {list(SPEEDS)}, got {speed!r}")
        source = _source(path, "decoder", dtype, speed)
        cached = _LOADED.get(source)
        if cached is not None:
            return (cached,)
        mm = comfy.module("comfy.model_management")
        device = mm.vae_device() if mm is not None else torch.device("cpu")
        if dtype != "auto":
            weight_dtype = DTYPES[dtype]
        elif mm is not None and device.type != "cpu":
            weight_dtype = mm.vae_dtype(device, [torch.bfloat16, torch.float16, torch.float32])
        else:
            weight_dtype = torch.float32
        wait_on = mm.vae_offload_device() if mm is not None else device
        try:
            sd = read_state_dict(path, device=wait_on, dtype=weight_dtype)
            if "decoder.head.2.weight" in sd:
                kind, module = "wan", wan_vae_from_state_dict(sd, source=decoder_name)
            elif "decoder.1.weight" in sd:
                decoder_sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
                kind, module = "taehv", taehv_from_state_dict(decoder_sd, source=decoder_name)
            else:
                raise CheckpointError(
                    f"{decoder_name}: neither a Wan 2.1 VAE (no decoder.head.2.weight) nor a TAEHV decoder "
                    f"(no decoder.1.weight)"
                )
        except CheckpointError as err:
            raise ValueError(f"{decoder_name} is not a Wan 2.1 VAE or TAEHV file: {err}") from err
        if kind == "wan" and speed == "fast" and device.type == "cuda" and has_triton():
            module.make_fast()
        handle = RFDecoder(Managed.wrap(module, mm is not None, vae=True), kind, decoder_name, source)
        _LOADED[source] = handle
        return (handle,)


NODE_CLASS_MAPPINGS = {
    "RewardForcingLoadModel": RewardForcingLoadModel,
    "RewardForcingLoRA": RewardForcingLoRA,
    "RewardForcingLoadDecoder": RewardForcingLoadDecoder,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardForcingLoadModel": "Reward Forcing: Load Model",
    "RewardForcingLoRA": "Reward Forcing: LoRA",
    "RewardForcingLoadDecoder": "Reward Forcing: Load Decoder",
}
