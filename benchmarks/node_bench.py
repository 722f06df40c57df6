"""The speed users get: the engine, the Stream Generate node and the Live node, in one process, at full size.

The nodes run in-process through the test graph executor (tests/graph_executor.py), as ComfyUI would
run them: Load Model and Load Decoder read synthetic full-size files (random weights, the real key
names) written to a temp models folder, with their default ``speed`` (fast). ComfyUI's model
management is replaced by a stand-in that keeps every model on the GPU, as ComfyUI does on an 80 GB
card; progress bars and the page sender are instrumented, not faked. Rows (one JSON line each):

* ``engine``: StreamSession + the same decoder objects through ``AsyncDecoder`` (as stream_bench);
* ``generate``: Stream Generate with our decoder (Load Decoder), MP4 written as chunks arrive;
* ``generate-comfy-vae``: Stream Generate with a ComfyUI-style Wan VAE object (the interface of
  ``comfy.sd.VAE``; on CUDA with Triton the node decodes it with our fast decoder and a copy of its
  weights, which is what is timed);
* ``live``: the Live node, recording on, as fast as possible (``realtime`` off), with prompt switches
  sent through the player's HTTP handler at random moments.

The CLIP is a full-size umT5-XXL with random weights on the GPU: its encode time counts in the switch
latency, and its 10.6 GiB of weights are left out of every peak memory figure (ComfyUI owns and
places the text encoder).

FPS = video frames / wall time of the node (or stream); for Live, the sustained rate between chunk
events after 4 warm-up chunks (switches included); TTFF = start to the first decoded frames on the
host (the node's first preview); switch latency = request to the moment the first chunk under
the new prompt is sent to the page (JPEG-encoded), which the player shows at its next frame.

    python benchmarks/node_bench.py --ref-json ref.json --out node.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rf_core.config import StreamConfig, get_preset  # noqa: E402
from rf_core.tiny import random_model, random_prompt, randomize_  # noqa: E402

FPS = 16.0
LOAD_MODEL = {
    "model_name": "rf.safetensors",
    "dtype": "auto",
    "attention": "auto",
    "placement": "auto",
    "speed": "fast",
}
DECODER_FILES = {"taehv": "taew2_1.pth", "wan": "wan_2.1_vae.safetensors"}


# ----------------------------------------------------------------------------- ComfyUI stand-ins
def install_model_management(device: torch.device, dtype: torch.dtype) -> None:
    """``comfy.model_management`` as ComfyUI behaves with ample GPU memory: everything on ``device``."""
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: device
    mm.unet_offload_device = lambda: device
    mm.vae_device = lambda: device
    mm.vae_offload_device = lambda: device
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.should_use_bf16 = lambda *a, **k: dtype == torch.bfloat16
    mm.should_use_fp16 = lambda *a, **k: dtype == torch.float16
    mm.vae_dtype = lambda *a, **k: dtype
    mm.load_models_gpu = lambda *a, **k: None
    mm.soft_empty_cache = lambda *a, **k: torch.cuda.empty_cache() if device.type == "cuda" else None
    mm.throw_exception_if_processing_interrupted = lambda: None
    pkg = types.ModuleType("comfy")
    pkg.__path__ = []
    pkg.model_management = mm
    sys.modules["comfy"] = pkg
    sys.modules["comfy.model_management"] = mm


class BenchCLIP:
    """A CLIP for CLIPTextEncode / the Live node: umT5-XXL (random weights) on the GPU, 512 tokens."""

    def __init__(self, cfg_name: str, device: torch.device, dtype: torch.dtype) -> None:
        from rf_core.text.umt5 import UMT5_XXL, UMT5Config, UMT5Encoder

        tiny = UMT5Config(vocab_size=96, dim=64, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=2)
        cfg = UMT5_XXL if cfg_name != "tiny" else tiny
        with torch.device("meta"):
            enc = UMT5Encoder(cfg)
        enc = enc.to_empty(device=device).to(dtype)
        g = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            for p in enc.parameters():
                p.normal_(0.0, 0.02, generator=g)
        self.encoder = enc.eval().requires_grad_(False)
        self.vocab = cfg.vocab_size
        self.device = device
        self.nbytes = sum(p.numel() * p.element_size() for p in enc.parameters())
        self.encode_seconds: list[float] = []

    def encode(self, text: str) -> torch.Tensor:  # what tests/native_stand_ins.py's CLIPTextEncode calls
        return self.encode_from_tokens_scheduled(self.tokenize(text))[0][0]

    def tokenize(self, text: str) -> dict:
        words = text.split()
        ids = torch.zeros(1, 512, dtype=torch.long)
        for i, w in enumerate(words[:511]):
            ids[0, i] = 1 + (hash(w) % (self.vocab - 2))
        ids[0, len(words[:511])] = 1  # EOS
        mask = torch.zeros(1, 512, dtype=torch.long)
        mask[0, : len(words[:511]) + 1] = 1
        return {"ids": ids, "mask": mask}

    @torch.no_grad()
    def encode_from_tokens_scheduled(self, tokens: dict) -> list:
        t0 = time.perf_counter()
        out = self.encoder(tokens["ids"].to(self.device), tokens["mask"].to(self.device))
        out = out.float().cpu()
        self.encode_seconds.append(time.perf_counter() - t0)
        return [[out, {"pooled_output": None}]]


def comfy_style_vae(path: Path, device: torch.device, dtype: torch.dtype):
    """An object with ``comfy.sd.VAE``'s interface for a Wan 2.1 VAE (tests/native_stand_ins.py)."""
    from native_stand_ins import FakeWanVAE

    vae = FakeWanVAE(path)
    vae.wan.to(device, dtype)
    vae.device, vae.vae_dtype = device, dtype
    vae.patcher = None  # what ComfyUI's memory manager would load: a no-op with the stand-in
    vae.memory_used_decode = lambda shape, dtype: 0
    return vae


# ----------------------------------------------------------------------------- set-up
def write_models(folder: Path, cfg, device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    from safetensors.torch import save_file

    from rf_core.vae.taehv import TAEHV, TAEHVConfig
    from rf_core.vae.wan_vae import WanVAE, WanVAEConfig

    dirs = {name: folder / name for name in ("diffusion_models", "vae", "vae_approx")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    dit = random_model(cfg, seed=0, device=device, dtype=dtype)
    save_file(
        {k: v.contiguous().cpu() for k, v in dit.state_dict().items()},
        dirs["diffusion_models"] / "rf.safetensors",
    )
    del dit
    vae = WanVAE(WanVAEConfig(dim=8) if tiny else WanVAEConfig())
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()}, dirs["vae"] / "wan_2.1_vae.safetensors"
    )
    taehv = randomize_(TAEHV(TAEHVConfig(widths=(8, 8, 8, 8))) if tiny else TAEHV())
    torch.save(taehv.state_dict(), dirs["vae_approx"] / "taew2_1.pth")
    return dirs


def load_pack(dirs: dict):
    """Import the repository as the ComfyUI pack ``rf_pack``, as ComfyUI imports a custom node folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rf_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["rf_pack"] = pack
    spec.loader.exec_module(pack)
    for name, path in dirs.items():
        pack.nodes.comfy.set_fallback_folders(name, [path])
    return pack


class ProgressSpy:
    """Stands in for comfy.Progress: records when the first preview (decoded frames) arrives."""

    first_preview: float | None = None

    def __init__(self, total: int, node_id: str | None = None) -> None:
        pass

    def update(self, value: int, preview: torch.Tensor | None = None) -> None:
        if preview is not None and ProgressSpy.first_preview is None:
            ProgressSpy.first_preview = time.perf_counter()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(minus: int = 0) -> float | None:
    if not torch.cuda.is_available():
        return None
    return round((torch.cuda.max_memory_allocated() - minus) / 2**30, 2)


# ----------------------------------------------------------------------------- rows
def engine_row(dit, decoder_module, kind: str, latent_frames: int, hw, device, minus: int) -> dict:
    from stream_bench import run_once

    from rf_core.pipeline import AsyncDecoder
    from rf_core.stream import StreamSession
    from rf_core.vae.stream_decode import TAEHVStreamDecoder, WanStreamDecoder

    inner = (
        WanStreamDecoder(decoder_module, latents_per_step=1)
        if kind == "wan"
        else TAEHVStreamDecoder(decoder_module)
    )
    decoder = AsyncDecoder(inner, device)
    prompt = random_prompt(dit.cfg, tokens=40, seed=0).to(device, dit.dtype)
    session = StreamSession(dit, prompt, hw, StreamConfig(), seed=0)
    run_once(session, latent_frames, decoder, sync, True)  # warm-up on this session's buffers
    reset_peak()
    r = run_once(session, latent_frames, decoder, sync, True)
    return {
        "fps": round(r["video_frames"] / r["total"], 2),
        "video_frames": r["video_frames"],
        "ttff_s": round(r["ttff"], 3),
        "chunk_p50_ms": round(1000 * statistics.median(r["chunk"][1:] or r["chunk"]), 1),
        "peak_gib": peak_gib(minus),
    }


def generate_prompt(
    decoder_input: dict, frames: int, width: int, height: int, seed: int, prefix: str
) -> dict:
    return {
        "1": {"class_type": "RewardForcingLoadModel", "inputs": LOAD_MODEL},
        "2": {"class_type": "BenchCLIPLoader", "inputs": {}},
        "3": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a red fox trotting through fresh snow", "clip": ["2", 0]},
        },
        "5": {
            "class_type": "RewardForcingStreamGenerate",
            "inputs": {
                "model": ["1", 0],
                "positive": ["3", 0],
                "seed": seed,
                "length": float(frames),
                "length_unit": "frames",
                "width": width,
                "height": height,
                "steps": 4,
                "filename_prefix": prefix,
                "fps": FPS,
                **decoder_input,
            },
        },
    }


def generate_row(executor, prompt: dict, minus: int) -> dict:
    ProgressSpy.first_preview = None
    reset_peak()
    t0 = time.perf_counter()
    results = executor.execute(prompt)
    seconds = time.perf_counter() - t0
    _latent, images = results["5"]
    frames = images.shape[0]
    return {
        "fps": round(frames / seconds, 2),
        "video_frames": frames,
        "ttff_s": round(ProgressSpy.first_preview - t0, 3) if ProgressSpy.first_preview else None,
        "peak_gib": peak_gib(minus),
        "mp4": bool(executor.ui.get("5")),
    }


def live_row(pack, model, decoder, clip, args, warmup_chunks: int) -> dict:
    live = pack.nodes.live.node
    routes = pack.nodes.live.routes
    sent: list[tuple[float, int, int]] = []  # (time, frames, prompt_version) of each chunk event
    requested: dict[int, float] = {}

    def page(event: str, payload: dict) -> None:
        if event.endswith(".chunk"):
            sent.append((time.perf_counter(), len(payload["frames"]), payload["prompt_version"]))

    original_sender = live.page_sender
    live.page_sender = lambda sid=None: page
    rng = random.Random(0)
    stop = threading.Event()
    seen: dict = {}

    def switcher() -> None:
        words = ["fox", "river", "city", "forest", "desert", "ocean", "storm", "night"]
        n = 0
        while not stop.is_set() and n < args.switches:
            running = routes.LIVE_SESSIONS.running()
            if running:
                seen["sid"] = running[0].session_id
            if not running or len(sent) < warmup_chunks:
                time.sleep(0.01)
                continue
            versions = [v for _, _, v in sent]
            if requested and max(versions) < max(requested):  # wait for the last switch to show
                time.sleep(0.005)
                continue
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment within the chunk in flight
            sid = running[0].session_id
            at = time.perf_counter()
            status, body = routes.handle("prompt", {"session": sid, "text": f"a {words[n % 8]} at dawn"})
            if status != 200:
                return
            requested[body["prompt_version"]] = at
            n += 1

    thread = threading.Thread(target=switcher, daemon=True)
    thread.start()
    reset_peak()
    t0 = time.perf_counter()
    out = live.RewardForcingLive().run(
        model, clip, "a red fox trotting through fresh snow", seed=0, width=args.width, height=args.height,
        steps=4, max_seconds=args.live_chunks * 0.75, recache=True, realtime=False,
        filename_prefix="bench/live", image_frames=81, decoder=decoder, unique_id="9",
    )  # fmt: skip
    stop.set()
    thread.join()
    live.page_sender = original_sender
    steady = sent[warmup_chunks - 1 :]
    frames = sum(n for _, n, _ in steady[1:])
    latencies = []
    for version, at in sorted(requested.items()):
        shown = [t for t, _, v in sent if v >= version]
        if shown:
            latencies.append(shown[0] - at)
    return {
        "fps_sustained": round(frames / (steady[-1][0] - steady[0][0]), 2),
        "video_frames": sum(n for _, n, _ in sent),
        "ttff_s": round(sent[0][0] - t0, 3),
        "switch_ms_median": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "switch_ms_all": [round(1000 * x) for x in latencies],
        "encode_ms_median": round(1000 * statistics.median(clip.encode_seconds), 1),
        "peak_gib": peak_gib(minus=clip.nbytes),
        "recording": bool(out["ui"]["rf_live_recording"]),
        "chunks_made": (routes.LIVE_SESSIONS.final_status(seen["sid"]) or {}).get("chunks") if seen else None,
        "chunks_sent": len(
            sent
        ),  # fewer than made: the page sender dropped chunks (it keeps at most 2 queued)
    }


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        default="wan2.1-t2v-1.3b",
        help="DiT size (default: %(default)s; 'tiny' for a CPU smoke run)",
    )
    p.add_argument("--height", type=int, default=480, help="video height (default: %(default)s)")
    p.add_argument("--width", type=int, default=832, help="video width (default: %(default)s)")
    p.add_argument("--frames", type=int, action="append", help="video frames per run (default: 81 and 477)")
    p.add_argument("--decoders", default="taehv,wan", help="our decoders to measure (default: %(default)s)")
    p.add_argument("--live-chunks", type=int, default=40, help="chunks per live run (default: %(default)s)")
    p.add_argument(
        "--switches", type=int, default=8, help="prompt switches per live run (default: %(default)s)"
    )
    p.add_argument("--ref-json", help="refbench.py output of the same command, for the ratio")
    p.add_argument("--out", help="write all rows as JSON here")
    args = p.parse_args()
    if args.live_chunks < 6:
        p.error(
            f"--live-chunks must be at least 6 (4 warm-up chunks, then a steady rate), got {args.live_chunks}"
        )
    frames_list = args.frames or [81, 477]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cudnn.benchmark = True
    tiny = args.preset == "tiny"
    cfg = get_preset(args.preset)
    install_model_management(device, dtype)
    hw = (args.height // 8, args.width // 8)

    tmp = tempfile.TemporaryDirectory()
    dirs = write_models(Path(tmp.name) / "models", cfg, device, dtype, tiny)
    pack = load_pack(dirs)
    pack.nodes.comfy.Progress = ProgressSpy
    from graph_executor import GraphExecutor
    from native_stand_ins import NATIVE

    clip = BenchCLIP(args.preset, device, dtype)

    class BenchCLIPLoader:
        RETURN_TYPES = ("CLIP",)
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return (clip,)

    classes = {**pack.NODE_CLASS_MAPPINGS, **NATIVE, "BenchCLIPLoader": BenchCLIPLoader}
    (model,) = pack.NODE_CLASS_MAPPINGS["RewardForcingLoadModel"]().load(**LOAD_MODEL)
    meta = {
        "bench": "node",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "size": f"{args.width}x{args.height}",
        "dtype": str(dtype).removeprefix("torch."),
        "text_encoder_gib": round(clip.nbytes / 2**30, 2),
    }
    print(json.dumps(meta), flush=True)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    loader = pack.NODE_CLASS_MAPPINGS["RewardForcingLoadDecoder"]()
    for kind in args.decoders.split(","):
        load_decoder = {"decoder_name": DECODER_FILES[kind], "dtype": "auto", "speed": "fast"}
        (decoder,) = loader.load(**load_decoder)  # the graph's Load Decoder gets this cached handle
        for frames in frames_list:
            row = engine_row(
                model.dit, decoder.managed.module, kind, (frames + 3) // 4, hw, device, clip.nbytes
            )
            emit({"row": "engine", "decoder": kind, "frames": frames, **row})
        executor = GraphExecutor(classes)
        for i, frames in enumerate([frames_list[0], *frames_list]):  # the first run warms up (compiles)
            prompt = generate_prompt(
                {"decoder": ["6", 0]}, frames, args.width, args.height, seed=i, prefix="bench/gen"
            )
            prompt["6"] = {"class_type": "RewardForcingLoadDecoder", "inputs": load_decoder}
            row = generate_row(executor, prompt, clip.nbytes)
            if i:
                emit({"row": "generate", "decoder": kind, "frames": frames, **row})
        emit({"row": "live", "decoder": kind, **live_row(pack, model, decoder, clip, args, warmup_chunks=4)})
        loaded = pack.nodes.load.loaders._LOADED
        for key in [k for k, v in loaded.items() if v is decoder]:
            del loaded[key]  # only one decoder resident at a time
        del decoder, executor
    # ComfyUI's own VAE object (Load VAE) into Stream Generate
    vae = comfy_style_vae(dirs["vae"] / "wan_2.1_vae.safetensors", device, dtype)
    executor = GraphExecutor(classes)
    executor.classes["VAEConst"] = _const_node("VAE", vae)
    for i, frames in enumerate([frames_list[0], *frames_list]):
        prompt = generate_prompt(
            {"vae": ["7", 0]}, frames, args.width, args.height, seed=i, prefix="bench/comfy"
        )
        prompt["7"] = {"class_type": "VAEConst", "inputs": {}}
        row = generate_row(executor, prompt, clip.nbytes)
        if i:
            emit({"row": "generate-comfy-vae", "decoder": "wan (ComfyUI VAE)", "frames": frames, **row})

    ref = {}
    if args.ref_json:
        for line in Path(args.ref_json).read_text().splitlines():
            if line.strip().startswith("{"):
                r = json.loads(line)
                if "latent_frames" in r:
                    ref[r["video_frames"]] = r
    print("\n| row | decoder | frames | FPS | vs reference | TTFF s | peak GiB | switch ms (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fps = r.get("fps", r.get("fps_sustained"))
        n = r.get("frames") or r.get("video_frames")
        ratio = f"{fps / ref[n]['fps']:.2f}x" if n in ref else "-"
        print(
            f"| {r['row']} | {r['decoder']} | {n} | {fps} | {ratio} | {r.get('ttff_s')} | {r.get('peak_gib')} | {r.get('switch_ms_median', '-')} |"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"meta": meta, "reference": list(ref.values()), "rows": rows}, indent=1)
        )
    tmp.cleanup()


def _const_node(socket: str, value):
    """A node that outputs an object built outside the graph (a loaded decoder, a VAE)."""

    class Const:
        RETURN_TYPES = (socket,)
        FUNCTION = "get"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def get(self):
            return (value,)

    return Const


if __name__ == "__main__":
    main()
