"""The chunked, KV-cached stream equals one full-sequence forward with a block-causal mask.

Independent formulation: for each chunk and each denoising step, run the bidirectional model on
[clean chunks 0..c-1 at t=0, current noisy chunk at t_i] with a mask letting chunk a attend chunk b
iff b <= a. Without eviction, the cache's window-relative RoPE positions equal absolute positions,
so both must agree (fp32, max abs diff <= 1e-5).
"""

import torch

from rf_core.config import StreamConfig
from rf_core.schedule import FlowSchedule
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt

H, W = 6, 8  # latent size -> 3x4 tokens per frame


def block_causal_mask(chunks: int, chunk_frames: int, frame_tokens: int) -> torch.Tensor:
    ids = torch.arange(chunks).repeat_interleave(chunk_frames * frame_tokens)
    return ids[None, :] <= ids[:, None]  # query chunk a sees key chunk b iff b <= a


def test_chunked_cache_equals_masked_full_sequence():
    model = random_model(seed=1)
    prompt = random_prompt(seed=2, tokens=11)
    cfg = StreamConfig(sink_policy="global", max_frames=12)
    n, chunks = cfg.chunk_frames, 4
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(1, n, 16, H, W, generator=g) for _ in range(chunks)]
    renoises = [[torch.randn(1, n, 16, H, W, generator=g) for _ in range(3)] for _ in range(chunks)]

    session = StreamSession(model, prompt, (H, W), cfg)
    streamed = [session.next_chunk(noises[c], renoises[c]) for c in range(chunks)]

    sched = FlowSchedule(5.0)
    ts = sched.warp([1000, 750, 500, 250])
    clean: list[torch.Tensor] = []
    for c in range(chunks):
        x = noises[c]
        for i, t in enumerate(ts):
            seq = torch.cat(clean + [x], dim=1)  # [1, frames, 16, H, W]
            tt = torch.tensor([[0.0] * (n * c) + [t] * n])
            mask = block_causal_mask(c + 1, n, (H // 2) * (W // 2))
            with torch.no_grad():
                v = model(seq.permute(0, 2, 1, 3, 4), tt, prompt, attn_mask=mask).permute(0, 2, 1, 3, 4)
            sigma = float(sched.sigma(t))
            x0 = (x.double() - sigma * v[:, -n:].double()).float()
            if i + 1 < len(ts):
                s_next = float(sched.sigma(ts[i + 1]))
                x = (1 - s_next) * x0 + s_next * renoises[c][i]
        clean.append(x0)
        assert (streamed[c] - x0).abs().max().item() <= 1e-5, f"chunk {c} differs"
    # the chunks really depend on their context: chunk 3 alone (no cache) would differ
    assert (streamed[3] - streamed[2]).abs().max() > 1e-2


def test_context_pass_keys_equal_full_sequence_keys():
    """The cache after 3 chunks holds the keys of a block-causal full-sequence pass at t=0 over the
    clean video (checked on every layer through the last layer's self-attention input)."""
    model = random_model(seed=3)
    prompt = random_prompt(seed=4)
    cfg = StreamConfig(sink_policy="global", max_frames=9)
    session = StreamSession(model, prompt, (H, W), cfg, seed=5)
    video = torch.cat([session.next_chunk() for _ in range(3)], dim=1)
    session.flush()  # the last chunk's (deferred) context pass

    captured = {}

    def hook(i):
        def fn(mod, args, out):
            captured[i] = out.detach()

        return fn

    handles = [blk.self_attn.norm_k.register_forward_hook(hook(i)) for i, blk in enumerate(model.blocks)]
    try:
        mask = block_causal_mask(3, 3, (H // 2) * (W // 2))
        with torch.no_grad():
            model(video.permute(0, 2, 1, 3, 4), torch.zeros(1, 9), prompt, attn_mask=mask)
    finally:
        for h in handles:
            h.remove()
    for i in range(model.cfg.num_layers):
        ref = captured[i].view_as(session.cache.k[i])
        assert (session.cache.k[i] - ref).abs().max().item() <= 1e-5, f"layer {i}"
