"""The objects RF_MODEL and RF_DECODER sockets carry, and how they cooperate with ComfyUI's memory manager.

Inside ComfyUI a module is wrapped in a ``ModelPatcher``: its weights wait on the offload device,
``acquire()`` asks ``load_models_gpu`` to move them to the compute device (unloading other models
when memory is short), and LoRAs are ComfyUI weight patches on a clone of the patcher, applied
when the clone is loaded and undone when another clone (or the base model) is loaded, so the
loaded weights are shared and never changed for good. Outside ComfyUI (tests, scripts) modules stay
where they were loaded and a LoRA is merged into a copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from rf_core.model.dit import WanDiT

from . import comfy


class ManagedBox(nn.Module):
    """What a ModelPatcher manages: the module under ``diffusion_model`` (so patch keys read like
    ComfyUI's own, ``diffusion_model.blocks.0.self_attn.q.weight``) and a writable ``device``
    attribute (the patcher assigns it; our modules derive theirs from their weights)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = module
        self.device = next(module.parameters()).device


class Managed:
    """A module plus, inside ComfyUI, the ModelPatcher that places it."""

    def __init__(self, module: nn.Module, patcher=None) -> None:
        self.module = module
        self.patcher = patcher

    @classmethod
    def wrap(cls, module: nn.Module, managed: bool = True, vae: bool = False) -> Managed:
        if not managed:
            return cls(module)
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        return cls(module, comfy.model_patcher(ManagedBox(module), size, vae))

    def acquire(self, extra_bytes: int = 0) -> nn.Module:
        """The module on its compute device with this handle's patches applied, ready to run."""
        if self.patcher is not None:
            comfy.load_models([self.patcher], memory_required=extra_bytes)
        return self.module


@dataclass(frozen=True)
class LoraSpec:
    name: str
    strength: float


@dataclass(eq=False)
class RFModel:
    """An RF_MODEL: the causal Wan DiT, the file and options it was loaded with, and the LoRAs on it."""

    managed: Managed
    name: str
    source: tuple  # (file, mtime, load options): equal for the same loaded weights
    loras: tuple[LoraSpec, ...] = ()
    base: RFModel | None = None  # the loaded model a LoRA handle derives from (kept alive with it)

    @property
    def dit(self) -> WanDiT:
        return self.managed.module

    @property
    def cfg(self):
        return self.dit.cfg

    @property
    def identity(self) -> tuple:
        """Equal for handles that give the same weights (same file and options, same LoRAs)."""
        return (self.source, self.loras)

    def acquire(self, extra_bytes: int = 0) -> WanDiT:
        return self.managed.acquire(extra_bytes)

    def with_lora(self, lora, name: str, strength: float) -> RFModel:
        """A new handle with ``lora`` (an ``rf_core.lora.Lora``) added at ``strength``; this one is unchanged."""
        from rf_core.lora import lora_param_deltas, merge_lora
        from rf_core.profiles import profile_of

        applied = profile_of(self.dit)
        if applied is not None and applied.name != "quality":
            raise ValueError(
                f"{name}: a LoRA needs the model's bf16 weights, but it was loaded with the {applied.name} "
                "profile (fp8 or offloaded weights): load it with profile quality to use LoRAs"
            )
        spec = LoraSpec(name, float(strength))
        # Checks that every LoRA layer fits a parameter of this model before anything changes.
        deltas = lora_param_deltas(lora, {k: p.shape for k, p in self.dit.named_parameters()})
        if self.managed.patcher is not None:
            patcher = self.managed.patcher.clone()
            patcher.add_patches(
                {f"diffusion_model.{k}": comfy.delta_patch(d) for k, d in deltas.items()}, spec.strength
            )
            managed = Managed(self.dit, patcher)
        else:
            dit = copy.deepcopy(self.dit)
            merge_lora(dit, lora, spec.strength)
            managed = Managed(dit)
        return RFModel(managed, self.name, self.source, (*self.loras, spec), self.base or self)


@dataclass(eq=False)
class RFDecoder:
    """An RF_DECODER: a loaded Wan VAE or TAEHV; each stream gets its own decoder state."""

    managed: Managed
    kind: str  # "wan" or "taehv"
    name: str
    source: tuple

    def new_stream(self):
        from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder

        if self.kind == "wan":
            # One latent frame per decoder pass: the same frames at a third of the activation memory.
            stream = WanStreamDecoder(self.managed.module, latents_per_step=1)
        else:
            stream = TAEHVStreamDecoder(self.managed.module)
        return _AcquiringStream(self, stream)

    @property
    def identity(self) -> tuple:
        return ("rf", self.source)


class _AcquiringStream:
    """A decoder stream that makes sure its weights are on the device and the input matches them.
    It holds the RF_DECODER handle, which keeps the loaded file shared while the stream lives."""

    def __init__(self, handle: RFDecoder, stream) -> None:
        self.handle = handle
        self.managed = handle.managed
        self.stream = stream

    def reset(self) -> None:
        self.stream.reset()

    def nbytes(self) -> int:
        """Memory of the Wan decoder's causal cache (TAEHV keeps only a few small frames: not counted)."""
        elements = getattr(self.stream, "cache_elements", None)
        if elements is None:
            return 0
        return elements() * next(self.managed.module.parameters()).element_size()

    def prepare(self, z: torch.Tensor) -> None:
        """Load the weights (on the caller's stream; see rf_core.pipeline.AsyncDecoder)."""
        self.managed.acquire()

    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        module = self.managed.acquire()
        p = next(module.parameters())
        return self.stream.decode_chunk(z.to(p.device, p.dtype))
