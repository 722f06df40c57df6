"""Build a Re-DMD trainer from a TrainConfig: models from checkpoint files (or random weights),
prompts from an embedding file, the reward and the VAE decoder for it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rf_core.config import DiTConfig, get_preset
from rf_core.train.config import TrainConfig
from rf_core.train.distributed import DistInfo
from rf_core.train.rewards import build_reward, needs_pixels
from rf_core.train.trainer import Decoder, PromptSet, ReDMDTrainer


def load_prompts(path: str, negative_entry: str, text_dim: int, text_len: int) -> PromptSet:
    """Every entry of an ``rf_core.text`` embedding file is a training prompt except the negative one."""
    from rf_core.text.embeddings import PromptEmbeddingError, load_prompt_embeddings

    if not path:
        raise ValueError(
            "data.prompt_embeddings is empty: give an embedding file (reward-forcing encode ...)"
        )
    file = load_prompt_embeddings(path, dim=text_dim, length=text_len, dtype=torch.float32)
    if negative_entry not in file.entries:
        raise PromptEmbeddingError(
            f"{path}: no negative prompt entry {negative_entry!r} (entries: {sorted(file.entries)[:10]})"
        )
    names = [n for n in file.entries if n != negative_entry]
    if not names:
        raise PromptEmbeddingError(f"{path}: holds only the negative prompt; add training prompts")
    return PromptSet(
        embeds=file.batch(names),
        negative=file[negative_entry].embeds,
        texts=[file[n].prompt for n in names],
    )


def encoded_prompts(
    config: TrainConfig, text_len: int, device: torch.device, dtype: torch.dtype
) -> PromptSet:
    """Prompts from ``data.prompts`` (one per line), encoded per micro-batch by the umT5 encoder."""
    from rf_core.text.text_encoder import TextEncoder

    d = config.data
    if not (d.text_encoder and d.tokenizer):
        raise ValueError("data.prompts needs data.text_encoder and data.tokenizer (the umT5 files)")
    with open(d.prompts, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"{d.prompts}: no prompts (one per line)")
    encoder = TextEncoder.from_files(
        d.tokenizer, d.text_encoder, device=device, dtype=dtype, max_length=text_len
    )
    negative = encoder.encode_prompts([d.negative_prompt])[0]
    return PromptSet(None, negative, texts, encoder=encoder.encode_prompts)


def _prompts(config: TrainConfig, cfg, device: torch.device, dtype: torch.dtype) -> PromptSet:
    d = config.data
    if d.prompt_embeddings:
        return load_prompts(d.prompt_embeddings, d.negative_entry, cfg.text_dim, cfg.text_len)
    if d.prompts:
        return encoded_prompts(config, cfg.text_len, device, dtype)
    raise ValueError("give data.prompt_embeddings (an embedding file) or data.prompts (a text file)")


def stream_decoder(new_stream: Callable[[], object], chunk_frames: int = 3) -> Decoder:
    """Frame-major model-space latents → frames [B, T, 3, H, W] in [0, 1], decoded chunk by chunk
    through a fresh ``rf_core.vae.stream_decode`` stream (Wan VAE or TAEHV) per call."""

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        stream = new_stream()
        n = latents.shape[1]
        return torch.cat(
            [stream.decode_chunk(latents[:, i : i + chunk_frames]) for i in range(0, n, chunk_frames)], 1
        )

    return decode


def build_trainer(
    config: TrainConfig, dist: DistInfo | None = None, interrupt: Callable[[], None] | None = None
) -> ReDMDTrainer:
    m = config.model
    device = dist.device if dist is not None else torch.device(config.run.device or _default_device())
    low = device.type == "cuda" and config.run.mixed_precision == "bf16"
    frozen_dtype = torch.bfloat16 if low else torch.float32
    # Prompts, VAE and reward before the DiTs (a 14B teacher takes minutes): a bad one fails first.
    cfg = _student_config(m)
    if m.random_preset and not (config.data.prompt_embeddings or config.data.prompts):
        from rf_core.tiny import random_prompt

        prompts = PromptSet(random_prompt(cfg, batch=4, seed=3), random_prompt(cfg, seed=4)[0])
    else:
        prompts = _prompts(config, cfg, device, frozen_dtype)
    decoder = None
    if m.vae:
        from rf_core.vae.stream_decode import WanStreamDecoder
        from rf_core.vae.wan_vae import load_wan_vae

        vae = load_wan_vae(m.vae, device=device, dtype=frozen_dtype)
        decoder = stream_decoder(lambda: WanStreamDecoder(vae), config.video.chunk_frames)
    try:
        reward = build_reward(config.reward.kind, config.reward.options, device=device)
    except (ValueError, ImportError) as err:
        raise ValueError(f"reward.kind {config.reward.kind!r}: {' '.join(str(err).split())}") from err
    if reward is not None and needs_pixels(reward) and decoder is None:
        raise ValueError(f"reward.kind {config.reward.kind!r} scores decoded frames: give model.vae")
    generator, teacher, critic = _models(m, device, frozen_dtype)
    return ReDMDTrainer(config, generator, teacher, critic, prompts, reward, decoder, dist, interrupt)


def _student_config(m) -> DiTConfig:
    """The student's shape, from the preset or the checkpoint's header (no weights are read)."""
    if m.random_preset:
        return get_preset(m.random_preset)
    from rf_core.io.checkpoints import open_dit_checkpoint

    for name in ("student", "teacher"):
        if not getattr(m, name):
            raise ValueError(f"model.{name} is empty: give a checkpoint path (or model.random_preset)")
    return open_dit_checkpoint(m.student).config


def _models(m, device: torch.device, frozen_dtype: torch.dtype):
    """(generator, teacher, critic): random weights of a preset, or the checkpoint files."""
    if m.random_preset:
        from rf_core.tiny import random_model

        return tuple(
            random_model(m.random_preset, seed=seed, attn_backend=m.attn_backend) for seed in (1, 2, 2)
        )
    from rf_core.io.checkpoints import load_dit

    generator = load_dit(m.student, dtype=torch.float32, attn_backend=m.attn_backend)
    teacher = load_dit(m.teacher, device=device, dtype=frozen_dtype, attn_backend=m.attn_backend)
    critic_src = {"teacher": m.teacher, "student": m.student}.get(m.critic, m.critic)
    critic = load_dit(critic_src, dtype=torch.float32, attn_backend=m.attn_backend)
    return generator, teacher, critic


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
