"""Generator rollout with self-forcing backward simulation (reference-algorithm.md §9.3).

Every chunk runs the few-step sampler exactly as at inference, up to a random exit step ``e``
shared by all chunks; steps before ``e`` run without gradients, step ``e`` with gradients, and its
x0 prediction is the chunk's output. A context pass at t = 0 (no gradients) then writes the chunk's
clean keys/values into the KV cache for the next chunks.

Deliberate choices (docs/training.md):
- Cache writes carry no gradient. The exit-step pass attends over a snapshot of the committed cache
  and writes nothing; the context pass runs under no_grad. The reference lets later chunks'
  gradients leak into earlier chunks' exit-step keys through its in-place buffer (§9.3, §13.20), an
  artefact of the buffer, not a design; we do not reproduce it.
- The context pass uses the clean x0 at t = 0, as inference does (the reference adds σ = 0.005
  noise there during training, §13.18).
- The cache is a static sink of 3 frames plus the previous chunk in a 9-frame window: the same
  keys the reference's 21-frame training buffer exposes (§2.7: c0 sees [c0]; c1 [c0, c1]; c2
  [c0, c1, c2]; c ≥ 3 [c0, c(c−1), c]), with no EMA during training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rf_core.config import StreamConfig
from rf_core.model.dit import WanDiT
from rf_core.stream import StreamSession


def training_stream_config(
    denoise_steps: Sequence[float] = (1000.0, 750.0, 500.0, 250.0),
    shift: float = 5.0,
    chunk_frames: int = 3,
    sink_frames: int = 3,
    window_frames: int = 9,
) -> StreamConfig:
    """Reference training-time cache semantics: a raw static sink, no EMA (§2.7)."""
    return StreamConfig(
        chunk_frames=chunk_frames,
        window_frames=window_frames,
        sink_frames=sink_frames,
        sink_policy="static",
        denoise_steps=tuple(float(s) for s in denoise_steps),
        shift=shift,
    )


def make_session(
    model: WanDiT,
    prompt_embeds: torch.Tensor,
    latent_hw: tuple[int, int],
    config: StreamConfig,
    seed: int,
    cache_dtype: torch.dtype | None = None,
    interrupt: Callable[[], None] | None = None,
) -> StreamSession:
    """A training StreamSession. ``cache_dtype`` (e.g. bf16 under autocast while the trainable
    weights stay float32) sets the dtype of the KV cache and of the noise: the cache snapshots the
    gradient passes keep until backward are the largest rollout tensors, so they should be stored at
    the compute precision, not the master-weight precision."""
    return StreamSession(
        model,
        prompt_embeds,
        latent_hw,
        config=config,
        seed=seed,
        interrupt=interrupt,
        key_storage="raw",
        cache_dtype=cache_dtype,
    )


def rollout(
    model: WanDiT,
    prompt_embeds: torch.Tensor,
    latent_hw: tuple[int, int],
    num_frames: int,
    exit_step: int,
    seed: int,
    config: StreamConfig,
    grad: bool,
    cache_dtype: torch.dtype | None = None,
    interrupt: Callable[[], None] | None = None,
    grad_frames: int | None = None,
) -> torch.Tensor:
    """Generate ``num_frames`` latent frames [B, F, C, h, w]. Sample i of the batch draws its noise
    from a generator seeded ``seed + i``. With ``grad``, each chunk's output carries gradients of its
    exit-step pass only, and with ``grad_frames`` only the chunks of the last ``grad_frames`` frames
    do: the earlier ones run (to the same exit step) without gradients, as the reference's gradient
    window (§9.3: gradients from frame total − 21 on)."""
    n = config.chunk_frames
    if num_frames <= 0 or num_frames % n:
        raise ValueError(f"num_frames {num_frames} must be a positive multiple of chunk_frames {n}")
    if grad_frames is not None and (grad_frames <= 0 or grad_frames % n):
        raise ValueError(f"grad_frames {grad_frames} must be a positive multiple of chunk_frames {n}")
    steps = len(config.denoise_steps)
    if not 0 <= exit_step < steps:
        raise ValueError(f"exit_step {exit_step} must be in [0, {steps})")
    first_grad_chunk = 0 if grad_frames is None else max(0, num_frames - grad_frames) // n
    session = make_session(model, prompt_embeds, latent_hw, config, seed, cache_dtype, interrupt)
    chunks = []
    for c in range(num_frames // n):
        x0, slot = session.denoise_chunk(exit_step=exit_step, grad=grad and c >= first_grad_chunk)
        session.finish_chunk(x0, slot)
        chunks.append(x0)
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def sample(
    model: WanDiT,
    prompt_embeds: torch.Tensor,
    latent_hw: tuple[int, int],
    num_frames: int,
    seed: int,
    config: StreamConfig | None = None,
) -> torch.Tensor:
    """Plain inference (all steps, the inference sink policy): for previews and evaluation."""
    config = config or StreamConfig()
    session = StreamSession(model, prompt_embeds, latent_hw, config=config, seed=seed)
    chunks = [session.next_chunk() for _ in range(num_frames // config.chunk_frames)]
    return torch.cat(chunks, dim=1)
