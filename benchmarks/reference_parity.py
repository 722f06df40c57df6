"""Numerical parity of rf_core with the reference Reward Forcing code, on random weights, fp32, CPU.

The reference (JaydenLyh/Reward-Forcing) is imported from a checkout given by ``--ref`` and never
copied here. It is run with three CPU patches (reference-algorithm.md §13(b)): the modules that call
``torch.cuda.current_device()`` at import are replaced by stubs, its flash-attention calls by a
dtype-preserving SDPA, and ``CausalWanModel`` is built directly instead of ``from_pretrained``. The
real 60x104 latent grid is kept (the reference hard-codes 1560 tokens per frame); the model is shrunk
in width, heads and layers instead.

Checks, with the same weights (the reference loads our state dict, strict):
1. one forward: our bidirectional ``WanDiT.forward`` against the reference ``WanModel``, and our first
   cached chunk pass (``StreamSession``, one denoising step) against ``CausalWanModel`` with its KV
   cache; also the keys/values both wrote into their caches;
2. a whole rollout: the reference ``CausalInferencePipeline.inference`` for 21 latent frames (7 chunks:
   eviction and the EMA sink act from chunk 3 on) against our ``StreamSession`` fed the same noise.
   The reference draws its re-noise with ``torch.randn_like``; that call is replaced during its run by
   draws from a seeded generator, which are recorded and replayed to our session (§4.3 RNG order:
   three re-noise draws per chunk). Then the two final caches (EMA sink included) are compared. Our
   rollout runs twice: with un-roped keys re-roped on every pass like the reference (key storage
   ``raw``, the default) and with keys stored roped (``roped``, the fast path's choice).
   As a sensitivity check it is repeated with a static sink: its difference from the reference shows
   how much the EMA changes the output, i.e. what the parity numbers resolve.

What to expect (dim 24, 2 heads, 2 layers, seed 0): with ``raw`` keys the rollouts and caches are
bit-identical (``roped``: float32 rounding of the extra rotations, ~1e-6). The
single forwards differ by a few float32 ulps (~2e-6 on outputs of ~7), from summation order only:
our bidirectional forward embeds the timestep once per frame ([B*f] rows) where ``WanModel`` embeds it
once per sample ([B] rows), and BLAS rounds a 1-row and a 3-row GEMM differently; and the reference
patchifies each sample of the batch of 2 separately where we convolve the batch. With batch 1 and
per-sample time embedding both are bit-identical too.

The reference needs diffusers (0.31.0 was used) and einops, which are not project dependencies:
``pip install --target /tmp/refdeps diffusers==0.31.0 einops`` and pass ``--deps /tmp/refdeps``.

Usage: python benchmarks/reference_parity.py [--ref refs/Reward-Forcing] [--deps /tmp/refdeps]
       [--dim 24 --heads 2 --layers 2 --frames 21 --tol 1e-4 --out FILE]
Prints a JSON summary; exits 1 if a difference exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from rf_core.config import DiTConfig, StreamConfig  # noqa: E402
from rf_core.model.dit import WanDiT  # noqa: E402
from rf_core.model.rope import apply_rope  # noqa: E402
from rf_core.stream import StreamSession  # noqa: E402
from rf_core.tiny import random_model, random_prompt  # noqa: E402

LATENT_HW = (60, 104)  # 30x52 = 1560 tokens per frame, hard-coded in the reference
REF_PACKAGES = ("wan", "wan.modules", "utils", "pipeline", "demo_utils")
# Reference modules replaced by stubs: they evaluate torch.cuda.current_device() at import or load
# weights we do not have (text encoder, tokenizer, VAE). The names are what the importers take.
REF_STUBS = {
    "wan.modules.t5": {"umt5_xxl": None},
    "wan.modules.tokenizers": {"HuggingfaceTokenizer": None},
    "wan.modules.vae": {"_video_vae": None},
    "demo_utils.memory": {
        "gpu": torch.device("cpu"),
        "get_cuda_free_memory_gb": lambda *a, **k: float("inf"),
        "DynamicSwapInstaller": None,
        "move_model_to_device_with_memory_preservation": None,
    },
}


@dataclass
class Reference:
    """The reference modules used here (imported once, patched for CPU)."""

    model: types.ModuleType  # wan.modules.model: WanModel
    causal: types.ModuleType  # wan.modules.causal_model: CausalWanModel
    wrapper: types.ModuleType  # utils.wan_wrapper: WanDiffusionWrapper
    pipeline: types.ModuleType  # pipeline.causal_inference: CausalInferencePipeline
    config: dict  # configs/default_config.yaml overridden by configs/reward_forcing.yaml


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, k_lens=None, **kwargs
) -> torch.Tensor:
    """Stand-in for the reference's ``flash_attention``/``attention``: [B, L, H, D] in and out, no
    mask, and the input dtype kept (the reference casts to bf16). Length masks only ever mark padding,
    which these checks never create; a call that would need one is refused rather than ignored."""
    if k_lens is not None and bool((torch.as_tensor(k_lens) != k.shape[1]).any()):
        raise ValueError(f"k_lens {k_lens.tolist()} would mask keys of a {k.shape[1]}-token sequence")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


_REFERENCE: dict[tuple[str, str | None], Reference] = {}


def import_reference(ref_dir: str | Path, deps: str | Path | None = None) -> Reference:
    """Import the reference from a checkout without its package ``__init__`` files (they pull in the
    whole text2video stack). ``deps``: a folder holding diffusers and einops, appended to sys.path.
    sys.modules is left without the reference's top-level names (``utils``, ``pipeline``...) afterwards,
    so they cannot shadow other imports; the imported modules keep working through their globals."""
    import yaml

    ref = Path(ref_dir).resolve()
    key = (str(ref), None if deps is None else str(Path(deps).resolve()))
    if key in _REFERENCE:
        return _REFERENCE[key]
    for rel in ("wan/modules/causal_model.py", "pipeline/causal_inference.py", "configs/reward_forcing.yaml"):
        if not (ref / rel).is_file():
            raise FileNotFoundError(f"{ref} is not a Reward-Forcing checkout: {rel} is missing")
    if key[1] is not None and key[1] not in sys.path:
        sys.path.append(key[1])
    for pkg in ("diffusers", "einops"):
        try:
            importlib.import_module(pkg)
        except ImportError as e:
            raise ImportError(
                f"the reference needs {pkg!r} ({e}); install it outside the project, e.g. "
                "`pip install --target /tmp/refdeps diffusers==0.31.0 einops`, and pass that folder as deps"
            ) from e
    names = set(REF_PACKAGES) | set(REF_STUBS)
    names |= {"wan.modules.attention", "wan.modules.model", "wan.modules.causal_model", "utils.scheduler"}
    names |= {"utils.wan_wrapper", "pipeline.causal_inference"}
    saved_modules = {n: sys.modules[n] for n in names if n in sys.modules}
    saved_path = list(sys.path)
    try:
        sys.path.insert(0, str(ref))
        for name in REF_PACKAGES:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(ref.joinpath(*name.split(".")))]
            sys.modules[name] = pkg
        for name, attrs in REF_STUBS.items():
            stub = types.ModuleType(name)
            stub.__dict__.update(attrs)
            sys.modules[name] = stub
        out = Reference(
            model=importlib.import_module("wan.modules.model"),
            causal=importlib.import_module("wan.modules.causal_model"),
            wrapper=importlib.import_module("utils.wan_wrapper"),
            pipeline=importlib.import_module("pipeline.causal_inference"),
            config={},
        )
    finally:
        sys.path[:] = saved_path
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved_modules)
    out.model.flash_attention = sdpa_attention  # WanModel self-attention, all cross-attention
    out.causal.attention = sdpa_attention  # CausalWanSelfAttention
    for name in ("default_config.yaml", "reward_forcing.yaml"):
        out.config.update(yaml.safe_load((ref / "configs" / name).read_text(encoding="utf-8")))
    _REFERENCE[key] = out
    return out


# ---------------------------------------------------------------------------------------- models
def tiny_config(dim: int = 24, heads: int = 2, layers: int = 2) -> DiTConfig:
    """A small DiT that keeps Wan's text width/length (head_dim >= 12 for the 3D RoPE split)."""
    return DiTConfig(dim=dim, ffn_dim=2 * dim, num_heads=heads, num_layers=layers)


def stream_config(ref: Reference, alpha: float) -> StreamConfig:
    """Our stream settings from the reference's own config files."""
    c = ref.config
    kw = c["model_kwargs"]
    return StreamConfig(
        chunk_frames=int(c["num_frame_per_block"]),
        window_frames=int(kw["local_attn_size"]),
        sink_frames=int(kw["sink_size"]),
        sink_policy="ema",
        ema_alpha=alpha,
        denoise_steps=tuple(float(s) for s in c["denoising_step_list"]),
        warp_steps=bool(c["warp_denoising_step"]),
        shift=float(kw["timestep_shift"]),
        context_timestep=float(c["context_noise"]),
    )


def ref_kwargs(cfg: DiTConfig) -> dict:
    return dict(
        model_type="t2v",
        patch_size=cfg.patch_size,
        text_len=cfg.text_len,
        in_dim=cfg.in_dim,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        qk_norm=True,
        cross_attn_norm=True,
        eps=cfg.eps,
    )


def reference_causal(ref: Reference, ours: WanDiT) -> torch.nn.Module:
    """The reference student with our weights (strict load: same key names and shapes)."""
    kw = ref.config["model_kwargs"]
    m = ref.causal.CausalWanModel(
        **ref_kwargs(ours.cfg), local_attn_size=int(kw["local_attn_size"]), sink_size=int(kw["sink_size"])
    )
    m.load_state_dict(ours.state_dict(), strict=True)
    return m.eval().requires_grad_(False)


def reference_teacher(ref: Reference, ours: WanDiT) -> torch.nn.Module:
    m = ref.model.WanModel(**ref_kwargs(ours.cfg))
    m.load_state_dict(ours.state_dict(), strict=True)
    return m.eval().requires_grad_(False)


def reference_wrapper(ref: Reference, causal: torch.nn.Module) -> torch.nn.Module:
    """``WanDiffusionWrapper`` around a prebuilt ``CausalWanModel`` (its constructor would load one)."""
    kw = ref.config["model_kwargs"]
    with mock.patch.object(ref.wrapper.CausalWanModel, "from_pretrained", lambda *a, **k: causal):
        return ref.wrapper.WanDiffusionWrapper(
            checkpoint_path="unused",
            timestep_shift=float(kw["timestep_shift"]),
            is_causal=True,
            local_attn_size=int(kw["local_attn_size"]),
            sink_size=int(kw["sink_size"]),
        )


def reference_caches(cfg: DiTConfig, batch: int, window_frames: int) -> tuple[list[dict], list[dict]]:
    """KV and cross-attention caches in the reference's layout, sized for this model (the reference
    hard-codes 12 heads x 128)."""
    tokens = window_frames * (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    shape = (batch, tokens, cfg.num_heads, cfg.head_dim)
    kv = [
        {
            "k": torch.zeros(shape),
            "v": torch.zeros(shape),
            "global_end_index": torch.tensor([0], dtype=torch.long),
            "local_end_index": torch.tensor([0], dtype=torch.long),
        }
        for _ in range(cfg.num_layers)
    ]
    cross = [{"k": None, "v": None, "is_init": False} for _ in range(cfg.num_layers)]
    return kv, cross


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def cache_diffs(session: StreamSession, kv: list[dict]) -> dict:
    """Max difference of the valid part of both caches (all layers; keys un-roped on both sides, or
    the reference's roped at their slot positions when our cache stores roped keys)."""
    c = session.cache
    n = c.frames * c.frame_tokens
    if n != int(kv[0]["local_end_index"]):
        raise AssertionError(f"our cache holds {n} tokens, the reference's {int(kv[0]['local_end_index'])}")
    ref_k = torch.stack([layer["k"][:, :n] for layer in kv])
    if c.roped:
        ref_k = apply_rope(ref_k, *session.model.rope.get(0, c.frames, *session.grid_hw, ref_k.device))
    ref_v = torch.stack([layer["v"][:, :n] for layer in kv])
    return {
        "cache_k_max_abs_diff": max_diff(c.k[:, :, :n], ref_k),
        "cache_v_max_abs_diff": max_diff(c.v[:, :, :n], ref_v),
        "cache_k_max_abs": ref_k.abs().max().item(),
    }


# ---------------------------------------------------------------------------------------- checks
@torch.no_grad()
def forward_parity(ref: Reference, model: WanDiT, seed: int = 0, prompt_tokens: int = 40) -> dict:
    """One forward on a 3-frame chunk, batch 2 (the reference loops over samples in places where we
    batch). The prompt is shorter than text_len, so both sides pad it. Bidirectional: a different
    timestep per sample. Cached first chunk: one denoising step at the warped t = 937.5 (our session's
    x0 against the reference wrapper's x0 = x - sigma * flow; sigma 0.9375, so x0 carries the flow)
    and the keys/values both wrote into their caches."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    frames = int(ref.config["num_frame_per_block"])
    x = torch.randn((2, cfg.in_dim, frames, *LATENT_HW), generator=g)
    ctx = random_prompt(cfg, batch=2, tokens=prompt_tokens, seed=seed + 1)[:, :prompt_tokens]
    t = torch.tensor([937.5, 250.0])
    out = {}

    teacher = reference_teacher(ref, model)
    tokens = frames * (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    want = teacher(list(x), t=t, context=list(ctx), seq_len=tokens)
    got = model(x, t, ctx)
    out["bidirectional_max_abs_diff"] = max_diff(got, want)
    out["bidirectional_max_abs"] = want.abs().max().item()

    # one warped step 750 -> t = 937.5, sigma 0.9375
    scfg = stream_config(ref, alpha=0.999).replace(denoise_steps=(750.0,))
    session = StreamSession(model, ctx, LATENT_HW, config=scfg)
    xf = x.permute(0, 2, 1, 3, 4)  # frame-major, as the pipeline feeds the wrapper
    ours, _slot = session.denoise_chunk(noise=xf)
    wrapper = reference_wrapper(ref, reference_causal(ref, model))
    kv, cross = reference_caches(cfg, 2, scfg.window_frames)
    flow, want = wrapper(
        noisy_image_or_video=xf,
        conditional_dict={"prompt_embeds": ctx},
        timestep=torch.full((2, frames), session.timesteps[0]),
        kv_cache=kv,
        crossattn_cache=cross,
        current_start=0,
    )
    out["cached_first_chunk_t"] = session.timesteps[0]
    out["cached_first_chunk_x0_max_abs_diff"] = max_diff(ours, want)
    out["cached_first_chunk_x0_max_abs"] = want.abs().max().item()
    out["cached_first_chunk_flow_max_abs"] = flow.abs().max().item()
    n = frames * session.cache.frame_tokens
    ref_k = torch.stack([layer["k"][:, :n] for layer in kv])
    ref_v = torch.stack([layer["v"][:, :n] for layer in kv])
    out["cached_first_chunk_cache_k_max_abs_diff"] = max_diff(session.cache.k[:, :, :n], ref_k)
    out["cached_first_chunk_cache_v_max_abs_diff"] = max_diff(session.cache.v[:, :, :n], ref_v)
    return out


class _StubTextEncoder(torch.nn.Module):
    """Returns fixed prompt embeddings (the pipeline's text encoder needs umT5 weights)."""

    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__()
        self.embeds = embeds

    def forward(self, text_prompts: list[str]) -> dict:
        return {"prompt_embeds": self.embeds}


class _IdentityVAE(torch.nn.Module):
    """The pipeline decodes at the end; the latents are what is compared, so skip the VAE."""

    def decode_to_pixel(self, latent: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return latent


@contextlib.contextmanager
def recorded_randn_like(generator: torch.Generator, record: list[torch.Tensor]):
    """Make ``torch.randn_like`` draw from ``generator`` and keep a copy of every draw."""
    original = torch.randn_like

    def draw(t: torch.Tensor, *, dtype=None, device=None, **kwargs) -> torch.Tensor:
        out = torch.randn(t.shape, generator=generator, dtype=dtype or t.dtype).to(device or t.device)
        record.append(out.clone())
        return out

    torch.randn_like = draw
    try:
        yield
    finally:
        torch.randn_like = original


@torch.no_grad()
def run_reference_rollout(
    ref: Reference, model: WanDiT, prompt: torch.Tensor, noise: torch.Tensor, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[dict], float]:
    """The reference pipeline on our weights: latents [B, T, 16, h, w], the re-noise draws in call
    order, its final KV cache and the EMA alpha its attention used."""
    causal = reference_causal(ref, model)
    conf = types.SimpleNamespace(**ref.config)
    with contextlib.redirect_stdout(sys.stderr):  # the pipeline prints a banner
        pipe = ref.pipeline.CausalInferencePipeline(
            conf,
            device=torch.device("cpu"),
            generator=reference_wrapper(ref, causal),
            text_encoder=_StubTextEncoder(prompt),
            vae=_IdentityVAE(),
        )
    pipe.num_transformer_blocks = model.cfg.num_layers
    pipe.kv_cache1, pipe.crossattn_cache = reference_caches(model.cfg, noise.shape[0], pipe.local_attn_size)
    draws: list[torch.Tensor] = []
    with recorded_randn_like(torch.Generator().manual_seed(seed), draws):
        _video, latents = pipe.inference(noise=noise, text_prompts=["unused"], return_latents=True)
    return latents, draws, pipe.kv_cache1, causal.blocks[0].self_attn.compression_alpha


@torch.no_grad()
def run_our_rollout(
    model: WanDiT,
    prompt: torch.Tensor,
    noise: torch.Tensor,
    draws: list[torch.Tensor],
    config: StreamConfig,
    key_storage: str,
) -> tuple[list[torch.Tensor], StreamSession]:
    """Our session over the same noise: chunk c takes noise frames [3c, 3c+3) and draws 3c..3c+2."""
    n = config.chunk_frames
    steps = len(config.denoise_steps) - 1
    b = noise.shape[0]
    session = StreamSession(model, prompt, LATENT_HW, config=config, key_storage=key_storage)
    chunks = []
    for c in range(noise.shape[1] // n):
        renoise = [d.unflatten(0, (b, n)) for d in draws[c * steps : (c + 1) * steps]]
        chunks.append(session.next_chunk(noise=noise[:, c * n : (c + 1) * n], renoise=renoise))
    session.flush()  # the last chunk's deferred context pass, so the caches compare
    return chunks, session


# Our two key storages: un-roped keys re-roped on every pass as the reference does ("raw"), or keys
# kept roped at their slot positions and rotated when they move (the fast path, "roped").
KEY_STORAGES = ("raw", "roped")


def rollout_parity(
    ref: Reference, model: WanDiT, frames: int = 21, seed: int = 0, prompt_tokens: int = 40
) -> dict:
    """Whole-rollout parity (see the module docstring): per-chunk max abs differences of the clean
    latents and the final caches, for each of our RoPE variants, plus the static-sink sensitivity run."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, frames, cfg.in_dim, *LATENT_HW), generator=g)
    prompt = random_prompt(cfg, batch=1, tokens=prompt_tokens, seed=seed + 1)[:, :prompt_tokens]
    t0 = time.perf_counter()
    ref_latents, draws, ref_kv, alpha = run_reference_rollout(ref, model, prompt, noise, seed + 2)
    out = {"latent_frames": frames, "ema_alpha": alpha, "reference_seconds": time.perf_counter() - t0}
    config = stream_config(ref, alpha)
    n = config.chunk_frames
    expected_draws = (frames // n) * (len(config.denoise_steps) - 1)
    if len(draws) != expected_draws:
        raise AssertionError(f"the reference drew {len(draws)} re-noise tensors, expected {expected_draws}")
    ref_chunks = [ref_latents[:, c * n : (c + 1) * n] for c in range(frames // n)]
    out["chunks"] = len(ref_chunks)
    out["per_chunk_max_abs"] = [r.abs().max().item() for r in ref_chunks]
    for name in KEY_STORAGES:
        t0 = time.perf_counter()
        ours, session = run_our_rollout(model, prompt, noise, draws, config, name)
        per_chunk = [max_diff(a, b) for a, b in zip(ours, ref_chunks)]
        out[name] = {
            "per_chunk_max_abs_diff": per_chunk,
            "max_abs_diff": max(per_chunk),
            **cache_diffs(session, ref_kv),
            "seconds": time.perf_counter() - t0,
        }
    static, _ = run_our_rollout(model, prompt, noise, draws, config.replace(sink_policy="static"), "raw")
    out["static_sink_per_chunk_max_abs_diff"] = [max_diff(a, b) for a, b in zip(static, ref_chunks)]
    return out


def parity_diffs(forward: dict, rollout: dict) -> list[float]:
    """Every difference that must stay within tolerance."""
    diffs = [v for k, v in forward.items() if k.endswith("_diff")]
    for name in KEY_STORAGES:
        r = rollout[name]
        diffs += r["per_chunk_max_abs_diff"] + [r["cache_k_max_abs_diff"], r["cache_v_max_abs_diff"]]
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default=str(ROOT / "refs" / "Reward-Forcing"), help="reference checkout")
    p.add_argument("--deps", default=None, help="folder with diffusers + einops (pip install --target)")
    p.add_argument("--dim", type=int, default=24)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=21, help="latent frames of the rollout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    ref = import_reference(args.ref, args.deps)
    cfg = tiny_config(args.dim, args.heads, args.layers)
    model = random_model(cfg, seed=args.seed, attn_backend="sdpa")
    t0 = time.perf_counter()
    fwd = forward_parity(ref, model, args.seed)
    t_fwd = time.perf_counter() - t0
    roll = rollout_parity(ref, model, args.frames, args.seed)
    diffs = parity_diffs(fwd, roll)
    summary = {
        "model": {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
                  "layers": cfg.num_layers, "text_dim": cfg.text_dim, "text_len": cfg.text_len,
                  "latent_hw": list(LATENT_HW), "dtype": "float32", "device": "cpu"},
        "forward": {**fwd, "seconds": t_fwd},
        "rollout": roll,
        "worst_max_abs_diff": max(diffs),
        "tolerance": args.tol,
        "pass": max(diffs) <= args.tol,
    }  # fmt: skip
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    sys.exit(0 if summary["pass"] else 1)


if __name__ == "__main__":
    main()
