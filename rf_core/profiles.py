"""Profiles: the one user-facing choice between output quality, GPU memory and speed (issue 14).

- ``quality`` (the default): today's fast bf16 path, ``make_fast`` (compiled blocks, roped key cache,
  CUDA graphs). The reference every other profile's difference is measured against.
- ``low-vram``: the same bf16 arithmetic on block weights stored in float8 e4m3 with one scale per
  output row (rf_core/model/fp8.py, half the weight memory), the blocks kept in pinned host memory and
  streamed to the GPU with prefetch on a side stream (rf_core/model/offload.py; CUDA graphs off, as a
  captured graph cannot follow the copies), the Wan decoder one frame per pass at its two top
  resolutions, and every decoder fed one latent frame at a time. Option: the KV cache stored in float8
  (``kv_dtype``), upcast per pass for attention (rf_core/model/kv_cache.py).
- ``turbo`` (opt-in, changes the output): SageAttention's INT8 attention (``sageattention``) and
  torchao's fp8 GEMMs with per-row scales (``torchao``), compiled so the activation quantisation fuses.
  CUDA only; a missing package is an error naming it.

Memory-only pieces (offload, decoder frames per pass, one latent per decoder call) change no number:
tests/test_profiles.py checks the output is bit-identical. The rounding pieces have documented bounds
(``ERROR_BOUNDS``) on the relative error of the latents against quality over 7 chunks at full size,
with the same weights, prompt and noise; benchmarks/profile_bench.py measures them.

Usage (a freshly loaded model, LoRAs applied; for low-vram load it on the CPU so that it never sits on
the GPU whole)::

    info = apply_profile(model, "low-vram", "cuda", compile=has_triton)
    decoder = profile_decoder(WanStreamDecoder(vae.make_fast(), latents_per_step=1), info)
    session = StreamSession(model, prompt, latent_hw)  # takes key storage, graphs, KV dtype from the model
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from rf_core.model.dit import WanDiT
from rf_core.model.offload import BlockOffload, offload_blocks
from rf_core.speed import make_fast

PROFILES = ("quality", "low-vram", "turbo")
KV_DTYPES = (torch.float8_e4m3fn,)  # the KV storage option; bf16 models already keep it in bf16

# Documented bounds: relative L2 error of the latents against quality over 7 chunks at 480x832 with
# the 1.3B architecture (random weights). Expected from earlier measurements (docs/benchmarks.md,
# run 6: fp8 GEMMs 3.7% against fp32 where bf16 is 1.1%); profile_bench.py reports the measured value.
ERROR_BOUNDS = {"quality": 0.0, "low-vram": 0.05, "turbo": 0.05}
KV_FP8_ERROR_BOUND = 0.03  # added by the float8 KV cache option

log = logging.getLogger("reward_forcing")
_APPLIED: weakref.WeakKeyDictionary[WanDiT, ProfileInfo] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ProfileInfo:
    """What ``apply_profile`` did to the model, and what the caller applies to the decoder.

    ``kv_dtype``: KV cache storage (None: the model's dtype), also set as ``model.kv_dtype``.
    ``wan_frames_per_pass``: for ``WanVAE.make_fast(frames_per_pass=...)`` (``profile_decoder`` sets it).
    ``decoder_latents_per_call``: latent frames per decoder call (``profile_decoder`` wraps the decoder).
    ``warnings``: one line each, for a setting the profile replaced (also logged).
    """

    name: str
    device: torch.device
    compiled: bool
    cuda_graphs: bool
    kv_dtype: torch.dtype | None = None
    wan_frames_per_pass: int | None = None
    decoder_latents_per_call: int | None = None
    offload: BlockOffload | None = None
    error_bound: float = 0.0
    warnings: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """One line for logs and benchmark rows."""
        parts = [f"profile {self.name}", "compiled" if self.compiled else "eager"]
        parts.append("CUDA graphs" if self.cuda_graphs else "no CUDA graphs")
        if self.offload is not None:
            parts.append(
                f"{len(self.offload.streamed)} blocks streamed from the host "
                f"({self.offload.device_bytes / 2**20:.0f} MiB of blocks on the device)"
            )
        if self.kv_dtype is not None:
            parts.append(f"KV cache in {str(self.kv_dtype).removeprefix('torch.')}")
        if self.decoder_latents_per_call:
            parts.append(f"decoder {self.decoder_latents_per_call} latent per call")
        return ", ".join(parts)


def apply_profile(
    model: WanDiT,
    name: str,
    device: torch.device | str,
    *,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    kv_dtype: torch.dtype | None = None,
    resident_blocks: int = 0,
) -> ProfileInfo:
    """Switch a freshly loaded model (in place) to profile ``name`` and place it on ``device``.

    compile: torch.compile the blocks (default: on CUDA; pass False where Triton is missing).
    cuda_graphs: replay repeating passes as CUDA graphs (default: on CUDA where the profile allows;
        asking for them where it does not gives a one-line warning and no graphs).
    kv_dtype: low-vram and turbo: keep the KV cache in this dtype (``torch.float8_e4m3fn``).
    resident_blocks: low-vram: blocks kept on the device, the others streamed from the host (all of
        them resident: no offload, and CUDA graphs allowed again).
    """
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {list(PROFILES)}")
    if model in _APPLIED or model.compiled or model.offload is not None:
        raise ValueError(
            "apply a profile once, to a freshly loaded model (this one already has a profile, or is compiled)"
        )
    if kv_dtype is not None and (name == "quality" or kv_dtype not in KV_DTYPES):
        raise ValueError(
            f"kv_dtype {kv_dtype} is not an option of profile {name!r}: low-vram and turbo take one of {KV_DTYPES}"
        )
    if not 0 <= resident_blocks <= len(model.blocks) or (resident_blocks and name != "low-vram"):
        raise ValueError(
            f"resident_blocks must be 0..{len(model.blocks)} and only for low-vram, got {resident_blocks} ({name})"
        )
    device = torch.device(device)
    cuda = device.type == "cuda"
    compile = cuda if compile is None else compile
    if name == "turbo":
        _check_turbo(device)
    warnings: list[str] = []

    def graphs_allowed(ok: bool, why: str) -> bool:
        if cuda_graphs and not ok:
            warnings.append(f"profile {name}: CUDA graphs off: {why}")
        return ok and (cuda if cuda_graphs is None else cuda_graphs)

    offload = None
    if name == "quality":
        model.to(device)
        graphs = graphs_allowed(True, "")
        make_fast(model, compile=compile, cuda_graphs=graphs)
    elif name == "low-vram":
        from rf_core.model.fp8 import store_linears_fp8

        store_linears_fp8(model, row_scale=True)  # where the model is: on the host, never whole on the GPU
        if resident_blocks < len(model.blocks):
            offload = offload_blocks(model, device, resident=resident_blocks)
        else:
            model.to(device)
        graphs = graphs_allowed(offload is None, "block offload copies weights during each pass")
        make_fast(model, compile=compile, cuda_graphs=graphs)
    else:
        from rf_core.model.fp8 import use_torchao_fp8_linears

        model.to(device)
        use_torchao_fp8_linears(model)
        model.attn_backend = "sage"
        if not compile:
            warnings.append(
                "profile turbo: not compiled, so torchao quantises activations in separate kernels"
            )
        graphs = graphs_allowed(_weights_have_addresses(model), "torchao's fp8 weights have no data pointer")
        # the GELU epilogue calls cuBLASLt on the weight directly, which torchao's fp8 weights are not
        make_fast(model, compile=compile, cuda_graphs=graphs, gelu_epilogue=False)
    model.kv_dtype = kv_dtype
    for line in warnings:
        log.warning(line)
    bound = ERROR_BOUNDS[name] + (KV_FP8_ERROR_BOUND if kv_dtype is not None else 0.0)
    info = _APPLIED[model] = ProfileInfo(
        name=name,
        device=device,
        compiled=compile,
        cuda_graphs=graphs,
        kv_dtype=kv_dtype,
        wan_frames_per_pass=1 if name == "low-vram" else None,
        decoder_latents_per_call=1 if name == "low-vram" else None,
        offload=offload,
        error_bound=bound,
        warnings=tuple(warnings),
    )
    return info


def profile_of(model: WanDiT) -> ProfileInfo | None:
    """The profile applied to ``model`` (None: none yet)."""
    return _APPLIED.get(model)


def _check_turbo(device: torch.device) -> None:
    """Everything turbo needs, before anything changes (a refused model is left as it was)."""
    from rf_core.model.attention import check_backend
    from rf_core.model.fp8 import torchao_fp8_config

    try:
        check_backend("sage")
    except ValueError as err:
        raise ValueError(f"profile 'turbo': {err}") from None
    try:
        torchao_fp8_config()
    except ValueError as err:
        raise ValueError(f"profile 'turbo': {err}") from None
    if device.type != "cuda":
        raise ValueError(
            f"profile 'turbo' runs on a CUDA GPU (INT8 attention, fp8 GEMMs), got device {device}"
        )
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(
            f"profile 'turbo' needs fp8 tensor cores (compute capability 8.9+: RTX 40xx, L4, H100), "
            f"got {torch.cuda.get_device_name(device)}"
        )


def _weights_have_addresses(model: WanDiT) -> bool:
    """CUDA graphs check weight addresses before each replay (rf_core/graphs.py); quantised tensor
    subclasses may have none."""
    try:
        for p in model.parameters():
            p.data_ptr()
    except RuntimeError:
        return False
    return True


class SplitChunks:
    """A stream decoder fed ``latents`` latent frames per call: the activation peak of that many
    frames instead of a whole chunk's. Stream decoders carry their state between calls, so the frames
    are those of whole chunks (Wan: bit-identical; TAEHV: its convolutions run on fewer frames at a
    time, which may round differently, see tests/test_profiles.py)."""

    def __init__(self, decoder, latents: int = 1) -> None:
        if latents < 1:
            raise ValueError(f"latents per decoder call must be >= 1, got {latents}")
        self.decoder = decoder
        self.latents = latents

    @property
    def frames_decoded(self) -> int:
        return self.decoder.frames_decoded

    def reset(self) -> None:
        self.decoder.reset()

    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        n = self.latents
        pieces = [self.decoder.decode_chunk(z[:, i : i + n]) for i in range(0, z.shape[1], n)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def profile_decoder(decoder, info: ProfileInfo):
    """The stream decoder (``WanStreamDecoder`` or ``TAEHVStreamDecoder``) with the profile's decoder
    settings; the Wan decoder's frames per pass is set in place (its fast path reads it per call)."""
    from rf_core.vae.stream_decode import WanStreamDecoder

    if info.wan_frames_per_pass is not None and isinstance(decoder, WanStreamDecoder):
        fast = decoder.vae.decoder.fast_path
        if fast is None:
            log.warning(
                "profile %s: the Wan decoder is not on its fast path (WanVAE.make_fast), so it decodes "
                "whole frames per pass",
                info.name,
            )
        else:
            fast.frames_per_pass = info.wan_frames_per_pass
    if info.decoder_latents_per_call:
        return SplitChunks(decoder, info.decoder_latents_per_call)
    return decoder
