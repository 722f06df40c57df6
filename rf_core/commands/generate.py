"""``reward-forcing generate``: the main job. Streams a video to MP4 (or PNGs) as chunks arrive."""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import torch

from rf_core.config import StreamConfig

TINY_NOTE = "tiny-random: a built-in random model that exercises the whole pipeline offline; it makes noise, not video"
DOWNLOAD_HINT = "get the files with `reward-forcing download --dir models` (see README)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a video from a prompt", description=__doc__)
    p.add_argument("--prompt", required=True, help="the prompt (or, with --prompt-embeds, an entry name)")
    p.add_argument(
        "--prompt-at",
        nargs=2,
        action="append",
        default=[],
        metavar=("TIME", "PROMPT"),
        help="switch prompt at TIME ('10s', '120f' video frames, '4c' chunks); repeatable",
    )
    p.add_argument(
        "--recache", action="store_true", help="re-cache the window under the new prompt at a switch"
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=5.0)
    length.add_argument("--frames", type=int, help="video frames (overrides --seconds)")
    p.add_argument("--out", default="video.mp4", help="output .mp4, or a folder for --png")
    p.add_argument("--png", action="store_true", help="write a PNG sequence into --out instead of an MP4")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--model", default="tiny-random", help="DiT checkpoint file, or 'tiny-random'")
    p.add_argument("--preset", default=None, help="require this model preset (error if the file differs)")
    p.add_argument(
        "--no-ema", action="store_true", help="use generator weights, not generator_ema, when both exist"
    )
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]")
    p.add_argument("--text-encoder", help="umT5-XXL weights (.pth or ComfyUI safetensors)")
    p.add_argument("--tokenizer", help="google/umt5-xxl tokenizer.json or its folder")
    p.add_argument("--prompt-embeds", help="prompt-embedding file (skips the text encoder)")
    p.add_argument("--decoder", choices=["wan", "taehv"], default="wan")
    p.add_argument("--vae", help="Wan2.1_VAE.pth or wan_2.1_vae.safetensors (decoder wan)")
    p.add_argument("--taehv", help="taew2_1.pth (decoder taehv)")
    p.add_argument("--width", type=int, default=None, help="default 832 (tiny-random: 128)")
    p.add_argument("--height", type=int, default=None, help="default 480 (tiny-random: 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sink-policy", choices=["ema", "static", "none", "global"], default="ema")
    p.add_argument("--window", type=int, default=9, help="window in latent frames, incl. sink and chunk")
    p.add_argument("--sink", type=int, default=3, help="sink frames")
    p.add_argument("--alpha", type=float, default=0.999, help="EMA-Sink alpha")
    p.add_argument("--steps", default="1000,750,500,250", help="denoising steps before warping")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--attn", default="auto", help="attention backend: auto, sdpa, cudnn, flash2, flash3")
    p.add_argument(
        "--fast",
        action="store_true",
        help="the fast path: compiled DiT and Wan decoder, fp32 RoPE, roped key cache, CUDA graphs (GPU)",
    )
    p.add_argument(
        "--fp8", action="store_true", help="fp8 GEMMs (Hopper; opt-in, changes the output slightly)"
    )
    p.set_defaults(func=run)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _need(path: str | None, what: str, flag: str) -> Path:
    if not path:
        raise SystemExit(f"error: {what} is needed: pass {flag} FILE; {DOWNLOAD_HINT}")
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: {what} file not found: {p}; {DOWNLOAD_HINT}")
    return p


def _tiny_prompt(text: str, cfg) -> torch.Tensor:
    from rf_core.tiny import random_prompt

    return random_prompt(cfg, tokens=min(cfg.text_len, 1 + len(text.split())), seed=zlib.crc32(text.encode()))


def _prompt_source(args, model_cfg, device, dtype):
    """Returns a function prompt text -> embeddings [1, L, text_dim]."""
    if args.model == "tiny-random":
        return lambda text: _tiny_prompt(text, model_cfg)
    if args.prompt_embeds:
        from rf_core.text.embeddings import load_prompt_embeddings

        f = load_prompt_embeddings(
            _need(args.prompt_embeds, "prompt embeddings", "--prompt-embeds"), dim=model_cfg.text_dim
        )
        by_text = {e.prompt: e for e in f.entries.values()}

        def lookup(text: str) -> torch.Tensor:
            e = f.entries.get(text) or by_text.get(text)
            if e is None:
                raise SystemExit(
                    f"error: {args.prompt_embeds} has no entry named or prompted {text!r}; it has {sorted(f.entries)}"
                )
            return e.embeds[None]

        return lookup
    from rf_core.text import TextEncoder

    enc = TextEncoder.from_files(
        _need(args.tokenizer, "the umT5 tokenizer", "--tokenizer"),
        _need(args.text_encoder, "the umT5-XXL text encoder", "--text-encoder"),
        device=device,
        dtype=dtype,
    )
    return lambda text: enc.encode_prompts([text])


def _load_model(args, device, dtype):
    if args.model == "tiny-random":
        from rf_core.tiny import random_model

        return random_model("tiny", seed=args.seed, device=device, dtype=dtype, attn_backend=args.attn)
    from rf_core.io.checkpoints import load_dit

    model = load_dit(
        _need(args.model, "the Reward Forcing model", "--model"),
        preset=args.preset,
        device=device,
        dtype=dtype,
        prefer_ema=not args.no_ema,
        attn_backend=args.attn,
    )
    for spec in args.lora:
        from rf_core.lora import apply_lora, load_lora

        path, _, strength = spec.partition(":")
        apply_lora(model, load_lora(_need(path, "LoRA", "--lora")), float(strength or 1.0))
    return model.eval().requires_grad_(False)


def _decoder(args, device, dtype):
    from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder

    if args.model == "tiny-random":
        from rf_core.vae.wan_vae import WanVAE, WanVAEConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            vae = WanVAE(WanVAEConfig(dim=8))
        return WanStreamDecoder(vae.to(device, dtype).eval())
    if args.decoder == "taehv":
        from rf_core.vae.taehv import load_taehv

        return TAEHVStreamDecoder(
            load_taehv(_need(args.taehv, "the TAEHV decoder", "--taehv"), device=device, dtype=dtype)
        )
    from rf_core.vae.wan_vae import load_wan_vae

    vae = load_wan_vae(_need(args.vae, "the Wan VAE", "--vae"), device=device, dtype=dtype)
    if args.fast:
        vae.make_fast(compile=device.type == "cuda")
    return WanStreamDecoder(vae, latents_per_step=1 if args.fast else None)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rf_core.io.video import Mp4Writer, PngSequenceWriter
    from rf_core.pipeline import AsyncDecoder
    from rf_core.stream import StreamSession
    from rf_core.timeline import build_timeline, latent_frames_for

    tiny = args.model == "tiny-random"
    if tiny:
        print(TINY_NOTE, file=sys.stderr)
    width = args.width or (128 if tiny else 832)
    height = args.height or (96 if tiny else 480)
    if width % 16 or height % 16:
        raise SystemExit(f"error: width and height must be multiples of 16, got {width}x{height}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        steps = tuple(float(s) for s in args.steps.split(","))
        config = StreamConfig(
            window_frames=args.window,
            sink_frames=args.sink,
            sink_policy=args.sink_policy,
            ema_alpha=args.alpha,
            denoise_steps=steps,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    video_frames = args.frames if args.frames is not None else round(args.seconds * args.fps)
    try:
        latent_frames = latent_frames_for(video_frames, config.chunk_frames)
        timeline = build_timeline(
            args.prompt, [tuple(c) for c in args.prompt_at], args.fps, config.chunk_frames
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if config.sink_policy == "global" and latent_frames > config.max_frames:
        config = config.replace(max_frames=latent_frames)
    chunks = latent_frames // config.chunk_frames

    model = _load_model(args, device, dtype)
    if args.fast or args.fp8:
        from rf_core.speed import make_fast

        cuda = device.type == "cuda"
        make_fast(
            model,
            compile=args.fast and cuda,
            rope_fp32=args.fast,
            fp8=args.fp8,
            cuda_graphs=args.fast and cuda,
        )
    embed = _prompt_source(args, model.cfg, device, dtype)
    cues = {c.chunk: embed(c.prompt) for c in timeline if c.chunk < chunks}
    decoder = _decoder(args, device, dtype)
    session = StreamSession(model, cues[0], (height // 8, width // 8), config, seed=args.seed)

    out = Path(args.out)
    writer = PngSequenceWriter(out) if args.png else Mp4Writer(out, fps=args.fps)
    written = 0
    start = time.perf_counter()
    decoder = AsyncDecoder(decoder, device)  # decodes chunk c while the DiT makes chunk c + 1

    def write(frames: torch.Tensor) -> None:
        nonlocal written
        writer.write(frames[0])  # uint8 [F, H, W, 3]
        written += frames.shape[1]
        bar.set_postfix(fps=f"{written / (time.perf_counter() - start):.1f}")
        bar.update()

    with writer, tqdm(total=chunks, unit="chunk", desc="generate") as bar:
        for c in range(chunks):
            if c in cues and c > 0:
                session.set_prompt(cues[c], recache=args.recache)
            decoder.submit(session.next_chunk())
            if c == 0 or len(decoder.pending) > 1:  # first frames at once, then one chunk behind
                write(decoder.result())
        for frames in decoder.drain():
            write(frames)
    print(f"wrote {written} frames ({width}x{height}, {args.fps:g} fps) to {out}", file=sys.stderr)
    return 0
