"""``reward-forcing generate``: the main job. Streams a video to MP4 (or PNGs) as chunks arrive.

Everything the user passed is checked before the model loads: values when the arguments are parsed,
then input files, the output path and the prompt timeline.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from rf_core.commands import argtypes
from rf_core.commands.errors import CliError, about, warning_line
from rf_core.commands.paths import input_path, output_file, output_folder
from rf_core.config import PRESETS, SINK_POLICIES, StreamConfig
from rf_core.prefix import prefix_latent_frames
from rf_core.profiles import PROFILES

COMMAND = "generate"
TINY = "tiny-random"
TINY_NOTE = "tiny-random: a built-in random model that exercises the whole pipeline offline; it makes noise, not video"
DOWNLOAD_HINT = "get the files with `reward-forcing download --dir models` (see README)"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULTS = StreamConfig()
# Lengths: above LONG_SECONDS of video a warning says how long the run is; above MAX_SECONDS it is refused
# (a mistyped length would otherwise run for days and fill the disk).
LONG_SECONDS = 3600.0
MAX_SECONDS = 24 * 3600.0

DESCRIPTION = """\
Stream a video from a prompt: the causal student makes it chunk by chunk and each chunk is decoded and
written as soon as it is ready (MP4 through ffmpeg, or a PNG sequence)."""

EPILOG = f"""\
examples:
  # offline check with the built-in random model (it makes noise, not video)
  reward-forcing generate --model tiny-random --prompt "a red fox running through snow" --seconds 2 --out out/video.mp4
  # the real model, a prompt switch at 10 s, the fast path on a GPU
  reward-forcing generate --model models/Reward-Forcing-T2V-1.3B/rewardforcing.pt --vae models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \\
      --text-encoder models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \\
      --tokenizer models/Wan2.1-T2V-1.3B/google/umt5-xxl \\
      --prompt "a red fox trotting through fresh snow" --prompt-at 10s "the fox leaps into a frozen river" \\
      --seconds 30 --fast --out fox.mp4
  # image to video: the image is the first frame; 5 s of new video after it, a switch at 3 s of the output
  reward-forcing generate --model tiny-random --image start.png --prompt "waves roll onto the beach" \
      --prompt-at 3s "a storm gathers over the sea" --seconds 5 --out beach.mp4
  # extend a video by 10 s: its frames open the output, and times count from its start
  reward-forcing generate --model tiny-random --extend beach.mp4 --prompt "the storm breaks" --seconds 10 \
      --prompt-at 12s "the sun comes out" --out beach_longer.mp4
  # a PNG sequence, prompts from a prompt-embedding file, a LoRA at strength 0.8
  reward-forcing generate --model models/Reward-Forcing-T2V-1.3B/rewardforcing.pt --vae models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \\
      --prompt-embeds prompts.safetensors --prompt fox --lora my_lora.safetensors:0.8 --png --out frames/

length: video is made in chunks of {DEFAULTS.chunk_frames} latent frames = 12 video frames (the first chunk
9), so a length is rounded up to whole chunks: --seconds 2 at 16 fps asks for 32 frames and makes 33.
Above {LONG_SECONDS / 3600:g} h of video a warning says how long the run is; above {MAX_SECONDS / 3600:g} h it is refused.

start image, extension: --image and --extend are encoded with the Wan VAE (--vae, also with --decoder
taehv) and prefilled into the stream, which goes on from them exactly as if it had made them. The
length asked for is the new video after them (12 frames per chunk). They open the output as given,
resized to cover the video's size and centre-cropped (a warning says so); the VAE encodes 1 + 4k
frames, so a video of another length loses its first 1 to 3 frames (with a warning). --prompt-at
times count from the start of the output, input frames included; chunks ('4c') count the chunks the
input is prefilled in (3 latent frames each; a start image is chunk 0), and a switch cannot fall
inside the input video after its first chunk.

output: the MP4 is written as <name>.<pid>-<token>.partial.mp4 next to --out and moved onto --out when
it is complete; Ctrl-C finishes the file with the frames so far. After a hard kill the partial file
holds them. An existing --out is replaced only with --overwrite; an input file never is."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(COMMAND, help="stream a video from a prompt", description=DESCRIPTION, epilog=EPILOG)
    prompts = p.add_argument_group("prompts")
    prompts.add_argument(
        "--prompt", required=True, help="the prompt (with --prompt-embeds: an entry's name or its prompt)"
    )
    prompts.add_argument(
        "--prompt-at",
        nargs=2,
        action="append",
        default=[],
        metavar=("TIME", "PROMPT"),
        help="switch to PROMPT at TIME: seconds '10s', video frames '120f' or chunks '4c' (the switch "
        "happens at the first chunk starting at or after TIME); repeatable",
    )
    prompts.add_argument(
        "--recache", action="store_true", help="at a switch, re-cache the window under the new prompt"
    )
    prompts.add_argument(
        "--prompt-embeds", metavar="FILE", help="prompt-embedding file (no text encoder needed)"
    )
    prompts.add_argument(
        "--text-encoder", metavar="FILE", help="umT5-XXL weights (.pth or ComfyUI safetensors)"
    )
    prompts.add_argument("--tokenizer", metavar="FILE", help="google/umt5-xxl tokenizer.json or its folder")

    start = p.add_argument_group("start from an image or a video")
    opening = start.add_mutually_exclusive_group()
    opening.add_argument(
        "--image",
        metavar="FILE",
        help="start image (PNG, JPEG...): the first frame of the video (needs --vae)",
    )
    opening.add_argument(
        "--extend",
        metavar="VIDEO",
        help="video to continue (MP4...): its frames open the output (needs --vae)",
    )

    video = p.add_argument_group("video")
    length = video.add_mutually_exclusive_group()
    length.add_argument(
        "--seconds",
        type=argtypes.positive_float,
        default=5.0,
        help="length in seconds, rounded up to whole chunks (with --image / --extend: of the new video)",
    )
    length.add_argument(
        "--frames",
        type=argtypes.positive_int,
        help="length in video frames instead of --seconds (default: none)",
    )
    video.add_argument("--fps", type=argtypes.frame_rate, default=16.0, help="frames per second of the video")
    video.add_argument(
        "--width", type=argtypes.video_size, help="multiple of 16 (default: 832; tiny-random: 128)"
    )
    video.add_argument(
        "--height", type=argtypes.video_size, help="multiple of 16 (default: 480; tiny-random: 96)"
    )
    video.add_argument("--seed", type=argtypes.seed, default=0, help="noise seed (same seed, same video)")
    video.add_argument(
        "--out",
        help="output .mp4 file, or with --png a folder (default: video.mp4, with --png: frames)",
    )
    video.add_argument(
        "--png", action="store_true", help="write a PNG sequence (frame_000000.png ...) into the --out folder"
    )
    video.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file (or the frame files in the --out folder)",
    )

    model = p.add_argument_group("model")
    model.add_argument("--model", default=TINY, help="DiT checkpoint file, or 'tiny-random' (offline, noise)")
    model.add_argument(
        "--preset", choices=sorted(PRESETS), help="require this model preset (error if the file differs)"
    )
    model.add_argument(
        "--no-ema", action="store_true", help="use generator weights, not generator_ema, when both exist"
    )
    model.add_argument(
        "--lora",
        action="append",
        default=[],
        type=argtypes.lora_spec,
        metavar="FILE[:STRENGTH]",
        help="LoRA to apply, strength 1.0 unless given; repeatable",
    )
    model.add_argument(
        "--decoder", choices=["wan", "taehv"], default="wan", help="wan: the Wan VAE; taehv: fast previews"
    )
    model.add_argument(
        "--vae",
        metavar="FILE",
        help="Wan2.1_VAE.pth or wan_2.1_vae.safetensors (--decoder wan; encodes --image / --extend)",
    )
    model.add_argument("--taehv", metavar="FILE", help="taew2_1.pth (--decoder taehv)")

    stream = p.add_argument_group("stream")
    stream.add_argument(
        "--sink-policy", choices=SINK_POLICIES, default=DEFAULTS.sink_policy, help="what happens to the sink"
    )
    stream.add_argument(
        "--window",
        type=argtypes.positive_int,
        help=f"latent frames attended, incl. sink and chunk (default: {DEFAULTS.window_frames}; "
        "not used by --sink-policy global)",
    )
    stream.add_argument(
        "--sink",
        type=argtypes.non_negative_int,
        help=f"sink frames (default: {DEFAULTS.sink_frames}; not used by --sink-policy none or global)",
    )
    stream.add_argument(
        "--alpha",
        type=argtypes.unit_float,
        help=f"EMA-Sink alpha in [0, 1] (default: {DEFAULTS.ema_alpha}; only --sink-policy ema)",
    )
    stream.add_argument(
        "--steps",
        type=argtypes.timesteps,
        default=",".join(f"{t:g}" for t in DEFAULTS.denoise_steps),
        help="denoising timesteps in (0, 1000], before warping",
    )

    speed = p.add_argument_group("device and speed")
    speed.add_argument(
        "--device",
        type=argtypes.device,
        default=argtypes.default_device(),
        help="cpu, cuda, cuda:N or mps (default: cuda when there is a GPU, else cpu)",
    )
    speed.add_argument(
        "--dtype", choices=sorted(DTYPES), help="compute dtype (default: bf16 on GPU, fp32 on CPU)"
    )
    speed.add_argument("--attn", type=argtypes.attention_backend, default="auto", help="attention backend")
    speed.add_argument(
        "--fast",
        action="store_true",
        help="the fast path: compiled DiT and Wan decoder, fp32 RoPE, roped key cache, CUDA graphs (GPU)",
    )
    speed.add_argument(
        "--fp8", action="store_true", help="fp8 GEMMs (Hopper; opt-in, changes the output slightly)"
    )
    speed.add_argument(
        "--profile",
        choices=list(PROFILES),
        default=None,
        help="quality: the --fast path; low-vram: fp8 block weights streamed from host memory, the Wan "
        "decoder a frame per pass (8-16 GB cards; within ~5%% of quality); turbo: sageattention and "
        "torchao fp8 GEMMs (opt-in, within ~5%%). Implies --fast (default: none, the path --fast picks)",
    )
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Plan:
    """What the run will do, settled before anything loads."""

    width: int
    height: int
    dtype: torch.dtype
    config: StreamConfig
    chunks: int
    cues: dict[int, str]  # chunk of the stream (prefill chunks included) -> prompt
    out: Path
    messages: list[str]  # notes and warnings, printed once everything has loaded
    prefix: torch.Tensor | None = None  # --image / --extend frames [1 + 4k, H, W, 3] in [0, 1], fitted

    @property
    def prefix_latents(self) -> int:
        return 0 if self.prefix is None else prefix_latent_frames(self.prefix.shape[0])


def run(args: argparse.Namespace) -> int:
    tiny = args.model == TINY
    plan = plan_run(args, tiny)
    # every other file before the DiT, so that a bad one fails before the long load
    embeds = _prompt_embeddings(args, plan)
    loras = _read_loras(args)
    vae = _wan_vae(args, plan, tiny)
    decoder = _decoder(args, plan, vae)
    cues = _encode_prompts(args, embeds, plan, tiny)
    model = _load_model(args, plan, tiny, loras)
    _check_prompt_embeddings(args, model.cfg, embeds, tiny)
    if args.profile is not None:
        from rf_core.profiles import profile_decoder

        decoder = profile_decoder(decoder, args.profile_info)
    for line in plan.messages:  # after every check and load: a failed run prints its error alone
        print(line, file=sys.stderr)
    return _stream(args, plan, model, cues, decoder, vae)


# ------------------------------------------------------------------ checks before any work


def plan_run(args: argparse.Namespace, tiny: bool) -> Plan:
    """Check everything the user passed, before anything loads."""
    warnings: list[str] = _ignored_flags(args, tiny)
    device = args.device
    if device.type != "cuda" and args.attn in ("cudnn", "flash2", "flash3"):
        raise CliError(f"--attn {args.attn}: needs a CUDA device, got --device {device}")
    if args.profile is not None and args.fp8:
        raise CliError(
            f"--profile {args.profile} and --fp8: a profile sets the weights' storage itself; drop --fp8"
        )
    if args.profile is not None:
        args.fast = True  # every profile builds on the fast path
    if device.type != "cuda" and args.fast:
        warnings.append(
            f"--fast on {device.type}: no compilation or CUDA graphs there, only fp32 RoPE and the roped key cache"
        )
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = _stream_config(args, warnings)
    width = args.width or (128 if tiny else 832)
    height = args.height or (96 if tiny else 480)
    inputs = _input_files(args, tiny)
    out = _output(args, inputs)
    prefix = _prefix(args, width, height, warnings)  # read now: its length moves the timeline
    prefix_latents = 0 if prefix is None else prefix_latent_frames(prefix.shape[0])
    frames, chunks, length_note = _length(args, config, warnings, prefix_latents)
    latent = prefix_latents + chunks * config.chunk_frames
    if config.sink_policy == "global" and latent > config.max_frames:
        warnings.append(
            f"--sink-policy global keeps all {latent} latent frames in the cache (memory grows with the "
            f"length; the model was trained on {config.max_frames})"
        )
        config = config.replace(max_frames=latent)
    cues = _timeline(args, config, chunks, frames, warnings, prefix_latents)
    messages = (
        [TINY_NOTE] * tiny
        + [warning_line(COMMAND, text) for text in warnings]
        + [length_note] * bool(length_note)
    )
    return Plan(width, height, dtype, config, chunks, cues, out, messages, prefix)


def _ignored_flags(args: argparse.Namespace, tiny: bool) -> list[str]:
    """Warnings for flags that the chosen mode does not use: said, never silently dropped."""
    given = [f for f in ("--preset", "--vae", "--taehv", "--text-encoder", "--tokenizer") if _value(args, f)]
    if tiny:
        given += ["--no-ema"] * args.no_ema + ["--decoder taehv"] * (args.decoder == "taehv")
        return [
            f"tiny-random ignores {', '.join(given)} (it has its own random decoder and text embeddings)"
        ] * bool(given)
    out = []
    encoder = [f for f in ("--text-encoder", "--tokenizer") if f in given]
    if args.prompt_embeds and encoder:
        out.append(f"--prompt-embeds is given, so {' and '.join(encoder)} not used")
    if args.decoder == "wan" and args.taehv:
        out.append("--taehv is not used with --decoder wan (pass --decoder taehv to use it)")
    if args.decoder == "taehv" and args.vae and not (args.image or args.extend):
        out.append("--vae is not used with --decoder taehv (only to encode --image or --extend)")
    return out


def _value(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def _stream_config(args: argparse.Namespace, warnings: list[str]) -> StreamConfig:
    policy = args.sink_policy
    unused = {
        "--alpha": args.alpha is not None and policy != "ema",
        "--sink": args.sink is not None and policy in ("none", "global"),
        "--window": args.window is not None and policy == "global",
    }
    warnings += [
        f"{flag} is not used by --sink-policy {policy}" for flag, ignored in unused.items() if ignored
    ]
    if args.recache and not args.prompt_at:
        warnings.append("--recache is not used without --prompt-at")
    window = DEFAULTS.window_frames if args.window is None else args.window
    sink = DEFAULTS.sink_frames if args.sink is None else args.sink
    with about(f"--window {window} / --sink {sink}"):
        return StreamConfig(
            window_frames=window,
            sink_frames=sink,
            sink_policy=policy,
            ema_alpha=DEFAULTS.ema_alpha if args.alpha is None else args.alpha,
            denoise_steps=args.steps,
        )


def _length(
    args: argparse.Namespace, config: StreamConfig, warnings: list[str], prefix: int = 0
) -> tuple[int, int, str]:
    """(video frames of the output, chunks to generate, a note when whole chunks make more frames than
    asked). After a prefix of ``prefix`` latent frames the length asked for is that of the new video."""
    from rf_core.timeline import chunk_start_frame, latent_frames_for, latent_start_frame

    if args.frames is not None:
        flag, asked = f"--frames {args.frames}", args.frames
    else:
        # a started frame counts, so the video is never shorter than asked (round first: 0.3 s at
        # 10 fps is 3.0000000000000004 frames)
        flag, asked = f"--seconds {args.seconds:g}", max(1, math.ceil(round(args.seconds * args.fps, 6)))
    seconds = asked / args.fps
    if seconds > MAX_SECONDS:
        raise CliError(
            f"{flag}: {seconds / 3600:.1f} hours of video at {args.fps:g} fps; at most "
            f"{MAX_SECONDS / 3600:g} hours per run"
        )
    cf, rest = config.chunk_frames, 4 * config.chunk_frames
    chunks = latent_frames_for(asked, cf, prefix) // cf
    opening = latent_start_frame(prefix)  # video frames of the prefix
    made = chunk_start_frame(chunks, cf) if not prefix else rest * chunks
    if seconds > LONG_SECONDS:
        warnings.append(
            f"{flag} is a long run: {made} frames ({seconds / 3600:.1f} h of video) in {chunks} chunks; "
            "Ctrl-C stops it and keeps the frames so far"
        )
    if prefix:
        note = (
            f"{asked} new frames asked; whole chunks make {made} ({chunks} chunks of {rest} frames) after the "
            f"{opening} input frame{'s' * (opening > 1)}"
        )
    else:
        first = chunk_start_frame(1, cf)
        note = (
            f"{asked} frames asked; whole chunks make {made} ({chunks} chunks: the first of {first} frames, "
            f"then {rest} each)"
        )
    return opening + made, chunks, note if made != asked else ""


def _timeline(
    args: argparse.Namespace,
    config: StreamConfig,
    chunks: int,
    frames: int,
    warnings: list[str],
    prefix: int = 0,
) -> dict[int, str]:
    """Chunk of the stream -> prompt; after a prefix of ``prefix`` latent frames its prefill chunks
    count (rf_core/timeline.py). A switch after the video's end is an error; two at one chunk, a warning."""
    from rf_core.timeline import build_timeline, chunk_start_frame, parse_time, prefill_chunks

    cf = config.chunk_frames
    total = prefill_chunks(prefix, cf) + chunks
    at = {0: "--prompt"}
    for when, prompt in args.prompt_at:
        with about("--prompt-at", when):
            chunk = parse_time(when, args.fps, cf, prefix)
        if chunk >= total:
            raise CliError(
                f"--prompt-at {when}: the switch would come at video frame "
                f"{chunk_start_frame(chunk, cf, prefix)} (chunk {chunk}), after the video's end "
                f"({frames} frames, {total} chunks); give an earlier time or a longer video"
            )
        if chunk in at:
            warnings.append(
                f"--prompt-at {when} {prompt!r} starts at the same chunk ({chunk}) as {at[chunk]}; "
                f"{prompt!r} replaces it there"
            )
        at[chunk] = f"--prompt-at {when}"
    timeline = build_timeline(args.prompt, args.prompt_at, args.fps, cf, prefix)
    return {c.chunk: c.prompt for c in timeline}


def _prefix(args: argparse.Namespace, width: int, height: int, warnings: list[str]) -> torch.Tensor | None:
    """The --image or --extend frames, fitted to the video's size and trimmed to 1 + 4k (warnings say
    what changed), or None."""
    from rf_core.io.video import read_image, read_video
    from rf_core.prefix import prefix_frames

    if args.image:
        flag, path = "--image", args.image
        with about(flag, path):
            frames = torch.from_numpy(read_image(path))
    elif args.extend:
        flag, path = "--extend", args.extend
        with about(flag, path):
            video, fps = read_video(path)
        if len(video) == 0:
            raise CliError(f"--extend {path}: the video has no frames")
        if abs(fps - args.fps) > 0.01:
            warnings.append(
                f"--extend {path} is {fps:g} fps and the output {args.fps:g} fps (--fps): its frames are kept, "
                f"so it plays {'slower' if fps > args.fps else 'faster'}; pass --fps {fps:g} to keep its speed"
            )
        frames = torch.from_numpy(video)
    else:
        return None
    frames, notes = prefix_frames(frames, width, height, f"{flag} {path}")
    warnings += notes
    return frames


def _need(path: str | None, what: str, flag: str, folder_ok: bool = False) -> Path:
    if not path:
        raise CliError(f"{flag} FILE is needed ({what}); {DOWNLOAD_HINT}")
    return input_path(path, flag, what, folder_ok=folder_ok, hint=DOWNLOAD_HINT)


def _input_files(args: argparse.Namespace, tiny: bool) -> list[tuple[str, Path]]:
    """Every file the run will read, checked to exist; also what the output must never be."""
    found = []
    if not tiny:
        found.append(("--model", _need(args.model, "Reward Forcing model", "--model", folder_ok=True)))
    found += [("--lora", input_path(path, "--lora", "LoRA")) for path, _ in args.lora]
    if args.prompt_embeds:
        found.append(
            ("--prompt-embeds", input_path(args.prompt_embeds, "--prompt-embeds", "prompt-embedding"))
        )
    elif not tiny:
        found.append(("--tokenizer", _need(args.tokenizer, "umT5 tokenizer", "--tokenizer", folder_ok=True)))
        found.append(("--text-encoder", _need(args.text_encoder, "umT5-XXL text encoder", "--text-encoder")))
    if args.image:
        found.append(("--image", input_path(args.image, "--image", "image")))
    if args.extend:
        found.append(("--extend", input_path(args.extend, "--extend", "video")))
    if not tiny and args.decoder == "taehv":
        found.append(("--taehv", _need(args.taehv, "TAEHV decoder", "--taehv")))
    if not tiny and (args.decoder == "wan" or args.image or args.extend):
        what = "Wan VAE" if args.decoder == "wan" else f"Wan VAE, which encodes {_prefix_flag(args)}"
        found.append(("--vae", _need(args.vae, what, "--vae")))
    return found


def _prefix_flag(args: argparse.Namespace) -> str:
    return "--image" if args.image else "--extend"


def _output(args: argparse.Namespace, inputs: list[tuple[str, Path]]) -> Path:
    from rf_core.io.video import PngSequenceWriter

    if not args.png:
        return output_file(
            args.out or "video.mp4",
            "--out",
            suffix=".mp4",
            inputs=inputs,
            overwrite=args.overwrite,
            what="video",
        )
    folder = output_folder(args.out or "frames", "--out", inputs=inputs)
    old = _frame_files(PngSequenceWriter(folder))
    if old and not args.overwrite:
        raise CliError(
            f"--out {folder}: holds {len(old)} frame files ({old[0].name} ...); pass --overwrite to replace them"
        )
    for name in old:  # even with --overwrite, an input stays
        output_file(str(name), "--out", suffix=".png", inputs=inputs, overwrite=True)
    return folder


def _frame_files(writer) -> list[Path]:
    if not writer.directory.is_dir():
        return []
    return sorted(writer.directory.glob(f"{writer.prefix}{'[0-9]' * writer.digits}.png"))


# ------------------------------------------------------------------ loading


def _prompt_embeddings(args: argparse.Namespace, plan: Plan):
    """The prompt-embedding file, with every prompt of the timeline found in it (before the model)."""
    if not args.prompt_embeds:
        return None
    from rf_core.text.embeddings import load_prompt_embeddings

    with about("--prompt-embeds", args.prompt_embeds):
        f = load_prompt_embeddings(args.prompt_embeds, dim=None)
    for prompt in plan.cues.values():
        if _lookup(f, prompt) is None:
            raise CliError(
                f"--prompt-embeds {args.prompt_embeds}: has no entry named or prompted {prompt!r}; "
                f"it has {sorted(f.entries)}"
            )
    return f


def _lookup(f, text: str):
    return f.entries.get(text) or next((e for e in f.entries.values() if e.prompt == text), None)


def _tiny_prompt(text: str, cfg) -> torch.Tensor:
    from rf_core.tiny import random_prompt

    return random_prompt(cfg, tokens=min(cfg.text_len, 1 + len(text.split())), seed=zlib.crc32(text.encode()))


def _encode_prompts(args: argparse.Namespace, embeds, plan: Plan, tiny: bool) -> dict[int, torch.Tensor]:
    """Chunk -> prompt embeddings [1, L, text_dim]. The text encoder runs before the DiT loads and is
    freed when done: it fails first if it is bad, and its memory is not held during the stream."""
    if embeds is not None:
        return {c: _lookup(embeds, prompt).embeds[None] for c, prompt in plan.cues.items()}
    if tiny:
        from rf_core.config import get_preset

        cfg = get_preset("tiny")  # tiny-random's model
        return {c: _tiny_prompt(prompt, cfg) for c, prompt in plan.cues.items()}
    from rf_core.text import TextEncoder

    with about(f"--text-encoder {args.text_encoder} / --tokenizer {args.tokenizer}"):
        enc = TextEncoder.from_files(args.tokenizer, args.text_encoder, device=args.device, dtype=plan.dtype)
    return {c: enc.encode_prompts([prompt]) for c, prompt in plan.cues.items()}


def _check_prompt_embeddings(args: argparse.Namespace, model_cfg, embeds, tiny: bool) -> None:
    """Every entry of a prompt-embedding file fits the model."""
    if embeds is None:
        return
    hint = " (tiny-random is a small random model)" if tiny else ""
    for name, e in embeds.entries.items():
        tokens, width = e.embeds.shape
        if width != model_cfg.text_dim or tokens > model_cfg.text_len:
            raise CliError(
                f"--prompt-embeds {args.prompt_embeds}: entry {name!r} is {tokens} tokens x {width}, "
                f"the model takes at most {model_cfg.text_len} tokens x {model_cfg.text_dim}{hint}"
            )


def _read_loras(args: argparse.Namespace) -> list[tuple[str, object, float]]:
    """(file, LoRA, strength) of each --lora: small files, read before the model."""
    from rf_core.lora import load_lora

    out = []
    for path, strength in args.lora:
        with about("--lora", path):
            out.append((path, load_lora(path), strength))
    return out


def _load_model(args: argparse.Namespace, plan: Plan, tiny: bool, loras: list):
    from rf_core.lora import apply_lora

    device, dtype = args.device, plan.dtype
    if tiny:
        from rf_core.tiny import random_model

        model = random_model("tiny", seed=args.seed, device=device, dtype=dtype, attn_backend=args.attn)
    else:
        from rf_core.io.checkpoints import load_dit

        with about("--model", args.model):
            model = load_dit(
                args.model,
                preset=args.preset,
                device="cpu" if args.profile == "low-vram" else device,  # never whole on the GPU
                dtype=dtype,
                prefer_ema=not args.no_ema,
                attn_backend=args.attn,
            )
    if args.no_ema and not tiny:
        from rf_core.commands.convert import no_ema_unused

        if text := no_ema_unused(args.model, model.load_info.section):
            plan.messages.append(warning_line(COMMAND, text))
    hint = " (tiny-random is a small random model: only a LoRA trained on it fits)" if tiny else ""
    for path, lora, strength in loras:
        with about("--lora", path):
            try:
                apply_lora(model, lora, strength)
            except ValueError as e:
                raise ValueError(f"{e}{hint}") from e
    if args.profile is not None:
        from rf_core.profiles import apply_profile

        cuda = device.type == "cuda"
        with about("--profile", args.profile):
            args.profile_info = apply_profile(model, args.profile, device, compile=cuda)
        for line in args.profile_info.warnings:
            print(warning_line(COMMAND, line), file=sys.stderr)
    elif args.fast or args.fp8:
        from rf_core.speed import make_fast

        cuda = device.type == "cuda"
        make_fast(
            model,
            compile=args.fast and cuda,
            rope_fp32=args.fast,
            fp8=args.fp8,
            cuda_graphs=args.fast and cuda,
        )
    return model.eval().requires_grad_(False)


def _wan_vae(args: argparse.Namespace, plan: Plan, tiny: bool):
    """The Wan VAE, where the run decodes or encodes with it (tiny-random: its own random one), else None."""
    device, dtype = args.device, plan.dtype
    if tiny:
        from rf_core.vae.wan_vae import WanVAE, WanVAEConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            vae = WanVAE(WanVAEConfig(dim=8))
        return vae.to(device, dtype).eval()
    if args.decoder != "wan" and plan.prefix is None:
        return None
    from rf_core.vae.wan_vae import load_wan_vae

    with about("--vae", args.vae):
        vae = load_wan_vae(args.vae, device=device, dtype=dtype)
    if args.fast and args.decoder == "wan":
        vae.make_fast(compile=device.type == "cuda")
    return vae


def _decoder(args: argparse.Namespace, plan: Plan, vae):
    from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder

    if args.decoder == "taehv" and args.model != TINY:
        from rf_core.vae.taehv import load_taehv

        with about("--taehv", args.taehv):
            return TAEHVStreamDecoder(load_taehv(args.taehv, device=args.device, dtype=plan.dtype))
    return WanStreamDecoder(vae, latents_per_step=1 if args.fast else None)


# ------------------------------------------------------------------ the stream


def _stream(
    args: argparse.Namespace, plan: Plan, model, cues: dict[int, torch.Tensor], decoder, vae=None
) -> int:
    from tqdm import tqdm

    from rf_core.io.video import Mp4Writer, PngSequenceWriter
    from rf_core.pipeline import AsyncDecoder
    from rf_core.stream import StreamSession
    from rf_core.timeline import prefill_chunks

    session = StreamSession(model, cues[0], (plan.height // 8, plan.width // 8), plan.config, seed=args.seed)
    if plan.prefix is not None:
        _prefill(session, decoder, vae, plan, args.device)
    # cues count the prefill chunks; generated chunk c is chunk c + opening of the stream
    opening = prefill_chunks(plan.prefix_latents, plan.config.chunk_frames)
    switches = {chunk - opening: embeds for chunk, embeds in cues.items() if chunk > 0}
    if args.png:
        writer = PngSequenceWriter(plan.out)
        old = _frame_files(writer)
    else:
        writer = Mp4Writer(plan.out, fps=args.fps, overwrite=args.overwrite)
    decoder = AsyncDecoder(decoder, args.device)  # decodes chunk c while the DiT makes chunk c + 1
    written = 0
    start = time.perf_counter()

    def write(frames: torch.Tensor) -> None:
        nonlocal written
        writer.write(frames[0])  # uint8 [F, H, W, 3]
        written += frames.shape[1]
        bar.set_postfix(fps=f"{written / (time.perf_counter() - start):.1f}")
        bar.update()

    with writer, tqdm(total=plan.chunks, unit="chunk", desc=COMMAND) as bar:
        if plan.prefix is not None:  # the input's own frames open the output
            writer.write(plan.prefix)
            written += plan.prefix.shape[0]
        for c in range(plan.chunks):
            if c in switches:
                session.set_prompt(switches[c], recache=args.recache)
            decoder.submit(session.next_chunk())
            if c == 0 or len(decoder.pending) > 1:  # first frames at once, then one chunk behind
                write(decoder.result())
        for frames in decoder.drain():
            write(frames)
    if args.png:  # --overwrite: the folder holds this run's frames only
        for stale in set(old) - set(writer.paths):
            stale.unlink()
    print(
        f"wrote {written} frames ({plan.width}x{plan.height}, {args.fps:g} fps) to {plan.out}",
        file=sys.stderr,
    )
    return 0


def _prefill(session, decoder, vae, plan: Plan, device: torch.device) -> None:
    """Encode the --image / --extend frames, prefill the stream with their latents and prime the
    decoder with them, so that the first new frames join the input's last frame without a seam."""
    from tqdm import tqdm

    from rf_core.prefix import encode_prefix

    latents = encode_prefix(vae, plan.prefix)
    with tqdm(total=latents.shape[1], unit="latent", desc="prefill") as bar:
        session.prefill(latents, on_chunk=lambda done, _total: bar.update(done - bar.n))
    step = plan.config.chunk_frames  # chunk by chunk: a long prefix is not decoded in one pass
    for i in range(0, latents.shape[1], step):
        decoder.decode_chunk(latents[:, i : i + step].to(device))  # frames dropped: the input's are written
