"""Training rollouts (reference-algorithm.md §9.3) and their cache semantics (§2.7)."""

import pytest
import torch
from _train_helpers import LATENT_HW

from rf_core.config import StreamConfig
from rf_core.tiny import random_model, random_prompt
from rf_core.train.rollout import make_session, rollout, sample, training_stream_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_cache_is_the_reference_training_window():
    """§2.7: chunk c attends to c0: [c0]; c1: [c0, c1]; c2: [c0, c1, c2]; c >= 3: [raw c0, c(c-1), c],
    and the sink holds chunk 0's clean keys unchanged (no EMA during training)."""
    model = random_model("tiny", seed=1)
    cfg = training_stream_config()
    session = make_session(model, random_prompt("tiny"), LATENT_HW, cfg, seed=0)
    sink = None
    for c in range(6):
        expected = list(range(3 * c)) if c <= 2 else [0, 1, 2, 3 * c - 3, 3 * c - 2, 3 * c - 1]
        with torch.no_grad():
            x0, slot = session.denoise_chunk()
        assert session.cache.frame_ids == expected, f"chunk {c}"
        assert slot == (len(expected), len(expected) + 3)
        session.finish_chunk(x0, slot)
        tokens = 3 * session.cache.frame_tokens
        if c == 0:
            sink = session.cache.k[:, :, :tokens].clone()
        torch.testing.assert_close(session.cache.k[:, :, :tokens], sink, rtol=0, atol=0)


def test_rollout_with_exit_step_equals_a_shorter_sampler():
    """Exit step e = running steps 0..e of the 4-step schedule, as a sampler configured with those
    steps does (same warped timesteps, same noise draws)."""
    model = random_model("tiny", seed=1)
    prompt = random_prompt("tiny", batch=2)
    full = training_stream_config()
    for e, steps in ((0, (1000.0,)), (2, (1000.0, 750.0, 500.0))):
        with torch.no_grad():
            out = rollout(model, prompt, LATENT_HW, 6, e, seed=5, config=full, grad=False)
        ref = sample(
            model,
            prompt,
            LATENT_HW,
            6,
            seed=5,
            config=StreamConfig(sink_policy="static", denoise_steps=steps),
        )
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_gradients_come_only_from_each_chunks_exit_step():
    """Cache writes carry no gradient: the gradient of chunk 1's output is the same whether or not
    chunk 0's exit step was run with gradients."""
    prompt = random_prompt("tiny")
    cfg = training_stream_config()
    grads = []
    for chunk0_grad in (True, False):
        model = random_model("tiny", seed=1)
        model.requires_grad_(True)
        session = make_session(model, prompt, LATENT_HW, cfg, seed=3)
        x0, slot = session.denoise_chunk(exit_step=2, grad=chunk0_grad)
        session.finish_chunk(x0, slot)
        x1, slot = session.denoise_chunk(exit_step=2, grad=True)
        assert x0.requires_grad == chunk0_grad and x1.requires_grad
        x1.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_gradient_window_leaves_earlier_chunks_without_gradients():
    """With ``grad_frames`` only the last chunks carry gradients (§9.3's window); the values are those
    of a rollout with gradients everywhere, and no gradient reaches the weights from earlier chunks."""
    model = random_model("tiny", seed=1)
    model.requires_grad_(True)
    prompt = random_prompt("tiny")
    cfg = training_stream_config()
    windowed = rollout(model, prompt, LATENT_HW, 9, 2, seed=4, config=cfg, grad=True, grad_frames=6)
    everywhere = rollout(model, prompt, LATENT_HW, 9, 2, seed=4, config=cfg, grad=True)
    torch.testing.assert_close(windowed, everywhere, rtol=0, atol=0)
    params = list(model.parameters())
    for x, expect_grad in ((windowed, False), (everywhere, True)):
        grads = torch.autograd.grad(x[:, :3].square().sum(), params, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().max() > 0 for g in grads) == expect_grad
    grads = torch.autograd.grad(windowed[:, 3:].square().sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in grads)


def test_rollout_rejects_bad_arguments():
    model = random_model("tiny", seed=1)
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        rollout(model, random_prompt("tiny"), LATENT_HW, 4, 0, 0, training_stream_config(), grad=False)
    with pytest.raises(ValueError, match="exit_step 4"):
        rollout(model, random_prompt("tiny"), LATENT_HW, 3, 4, 0, training_stream_config(), grad=False)
    with pytest.raises(ValueError, match="grad_frames 4 must be a positive multiple"):
        rollout(
            model,
            random_prompt("tiny"),
            LATENT_HW,
            6,
            0,
            0,
            training_stream_config(),
            grad=True,
            grad_frames=4,
        )


def test_bf16_cache_under_autocast_with_float32_weights():
    """Mixed precision keeps float32 master weights; the cache and noise use the compute dtype."""
    model = random_model("tiny", seed=1)
    prompt = random_prompt("tiny")
    cfg = training_stream_config()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        session = make_session(model, prompt, LATENT_HW, cfg, 0, torch.bfloat16)
        assert session.cache.k.dtype == torch.bfloat16 and session.dtype == torch.bfloat16
        out = rollout(model, prompt, LATENT_HW, 6, 3, 0, cfg, grad=False, cache_dtype=torch.bfloat16)
    ref = rollout(model, prompt, LATENT_HW, 6, 3, 0, cfg, grad=False)
    assert out.dtype == torch.bfloat16
    # same noise (drawn in bf16 vs fp32) and maths at lower precision: close, not equal
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()
