"""Live: one long node run that streams until Stop, shows every chunk in the node's player, takes new
prompts from the page, and records the whole run to an MP4.

The node wires ComfyUI objects into ``LiveLoop`` (nodes/live/loop.py): the connected CLIP encodes
each prompt on the prompt worker thread, chunks go to the page as ``rewardforcing.live.*``
WebSocket events (nodes/live/transport.py), and the page controls the run through the routes in
nodes/live/routes.py. The player itself is web/js/live.js.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from rf_core.config import StreamConfig
from rf_core.stream import StreamSession

from .. import comfy
from ..common import (
    CATEGORY,
    WAN_FPS,
    check_size,
    comfy_vae_input,
    model_input,
    recache_widget,
    refuse,
    seed_widget,
    size_widget,
    steps_widget,
    stream_settings_input,
    stream_state_bytes,
)
from ..conditioning import prompt_embeds
from ..model_handle import RFModel
from ..stream.decoders import decoder_stream
from ..stream.generate import stream_inputs
from ..video.files import VideoFiles
from .loop import LiveLoop, LiveResult
from .routes import MAX_PROMPT_CHARS, register_routes
from .sessions import LIVE_SESSIONS, new_session_id
from .transport import ERROR_EVENT, STATE_EVENT, ChunkSender

RECORDING_UI_KEY = "rf_live_recording"  # the node's UI output: [{"filename", "subfolder", "type"}]
AHEAD_SECONDS = 1.0  # how far generation may run ahead of playback with "realtime" on


class RewardForcingLive:
    DESCRIPTION = (
        "Live mode: generates chunk after chunk until you press Stop (or Cancel, or the length cap), shows "
        "each chunk in the node's player as soon as it is decoded, and takes new prompts typed into the "
        "player (Enter) from the next chunk on. The whole run is recorded to an MP4 in the output folder."
    )
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "VIDEO")
    RETURN_NAMES = ("images", "video")
    OUTPUT_TOOLTIPS = (
        "The last image_frames frames of the run (the MP4 holds all of it).",
        "The recording of the whole run (the MP4 in the output folder).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "umT5 text encoder (CLIPLoader, type 'wan'); encodes the prompt and every prompt "
                        "typed into the player while the stream runs."
                    },
                ),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "a red fox trotting through fresh snow at dawn, cinematic",
                        "tooltip": "The prompt the stream starts with; type new ones into the player while it runs.",
                    },
                ),
                "seed": seed_widget("Noise seed of the stream."),
                "width": size_widget(832, "width"),
                "height": size_widget(480, "height"),
                "steps": steps_widget(),
                "max_seconds": (
                    "FLOAT",
                    {
                        "default": 120.0,
                        "min": 0.75,
                        "max": 36000.0,
                        "step": 0.75,
                        "tooltip": "Length cap: the run ends by itself after this much video (Stop ends it sooner).",
                    },
                ),
                "recache": recache_widget("switch"),
                "realtime": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Pace generation to playback (at most about a second ahead), so prompt switches show "
                        "quickly when the GPU is faster than real time. Off: generate as fast as possible.",
                    },
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "RewardForcing/live",
                        "tooltip": "Name of the recording in the output folder.",
                    },
                ),
                "image_frames": (
                    "INT",
                    {
                        "default": 81,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "How many of the last frames the images output holds (81 = 5 s).",
                    },
                ),
            },
            "optional": {
                "settings": stream_settings_input(),
                "decoder": (
                    "RF_DECODER",
                    {"tooltip": "Decoder from Load Decoder: TAEHV (taew2_1) for speed, or the Wan 2.1 VAE."},
                ),
                "vae": comfy_vae_input("use it instead of a decoder."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **_widgets):
        return float("nan")  # a live run always runs

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, prompt=None):
        prompt_error = None
        if prompt is not None and not prompt.strip():
            prompt_error = "prompt is empty: type what the stream should show"
        elif prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
            prompt_error = f"prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}"
        return refuse(check_size(width, height), prompt_error)

    def run(
        self,
        model,
        clip,
        prompt: str,
        seed: int,
        width: int,
        height: int,
        steps: int,
        max_seconds: float,
        recache: bool = True,
        realtime: bool = True,
        filename_prefix: str = "RewardForcing/live",
        image_frames: int = 81,
        settings: StreamConfig | None = None,
        decoder=None,
        vae=None,
        unique_id: str | None = None,
    ):
        model, config, hw = stream_inputs(model, settings, steps, width, height)
        decode, _ = decoder_stream(vae, decoder)
        if decode is None:
            raise ValueError(
                "live mode needs decoded frames: connect a decoder (Load Decoder with taew2_1.pth for speed, "
                "or the Wan 2.1 VAE) or a VAE"
            )
        if not filename_prefix.strip():
            raise ValueError(
                "filename_prefix is empty: give the recording a name such as 'RewardForcing/live'"
            )
        state_bytes = stream_state_bytes(model.cfg, config, hw, 1, model.dit.dtype)
        encode = clip_encoder(clip, model, state_bytes)
        embeds = encode(prompt)
        dit = model.acquire(state_bytes)
        session = StreamSession(dit, embeds, hw, config, seed=seed)
        live = LiveRun(
            session,
            _KeepModelLoaded(decode, model, state_bytes),
            encode,
            prompt=prompt,
            fps=WAN_FPS,
            max_seconds=max_seconds,
            recache=recache,
            realtime=realtime,
            image_frames=image_frames,
            node_id=unique_id,
            files=VideoFiles(filename_prefix, WAN_FPS, 1, width, height),
        )
        result, entries = live.run()
        video = _video_output(os.path.join(comfy.output_directory(), *_entry_path(entries)))
        images = result.images.to(comfy.intermediate_device())
        # Under its own key: ComfyUI's generic video preview would duplicate the player on the node.
        return {"ui": {RECORDING_UI_KEY: entries}, "result": (images, video)}


def clip_encoder(clip, model: RFModel, state_bytes: int) -> Callable[[str], torch.Tensor]:
    """text -> [1, text_len, text_dim] embeddings through ComfyUI's CLIP (as CLIPTextEncode does)."""
    if clip is None or not hasattr(clip, "tokenize"):
        raise ValueError(f"clip: expected a CLIP from CLIPLoader (type 'wan'), got {type(clip).__name__}")

    def encode(text: str) -> torch.Tensor:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        embeds = prompt_embeds(cond, model.cfg.text_dim, model.cfg.text_len, what="prompt")
        # Loading the text encoder may have pushed the DiT off the GPU: bring it back.
        model.acquire(state_bytes)
        return embeds

    return encode


class _KeepModelLoaded:
    """Decoder stream whose ``prepare`` (called by the live loop's AsyncDecoder before each decode)
    loads the decoder and then makes sure the DiT is loaded too (ComfyUI may unload one model to load
    another when memory is short)."""

    def __init__(self, inner, model: RFModel, state_bytes: int) -> None:
        self.inner = inner
        self.model = model
        self.state_bytes = state_bytes

    def prepare(self, z: torch.Tensor) -> None:
        """Both models loaded, on the caller's stream, before the decode is queued on its own stream."""
        inner = getattr(self.inner, "prepare", None)
        if inner is not None:
            inner(z)
        self.model.acquire(self.state_bytes)

    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.decode_chunk(z)

    def reset(self) -> None:
        self.inner.reset()


class LiveRun:
    """A LiveLoop wired to the page and to the recording; ``run`` registers it for the page's requests."""

    def __init__(
        self,
        session: StreamSession,
        decode,
        encode: Callable[[str], torch.Tensor],
        *,
        prompt: str,
        fps: float,
        max_seconds: float,
        recache: bool,
        realtime: bool,
        image_frames: int,
        node_id: str | None,
        files: VideoFiles,
        send: Callable[[str, dict], None] | None = None,
    ) -> None:
        """``send``: (event, payload) to the browser; ComfyUI's WebSocket by default."""
        send = send or page_sender()
        frames_per_chunk = 4 * session.config.chunk_frames
        max_chunks = max(1, math.ceil(max_seconds * fps / frames_per_chunk))
        self.files = files
        self.sender = ChunkSender(send, fps, node_id)
        progress = comfy.Progress(max_chunks, node_id)

        def on_chunk(chunk) -> None:
            self.sender.submit(chunk)
            progress.update(chunk.index + 1)  # the player shows the details

        def on_event(name: str, payload: dict) -> None:
            send(ERROR_EVENT if name == "error" else STATE_EVENT, payload)

        self.loop = LiveLoop(
            new_session_id(),
            session,
            decode,
            encode,
            on_chunk,
            on_event=on_event,
            writer=files.queued[0],
            prompt=prompt,
            max_chunks=max_chunks,
            recache=recache,
            keep_frames=image_frames,
            interrupt=comfy.interrupt_check(),
            fps=fps,
            node_id=node_id,
            realtime=realtime,
            ahead_seconds=AHEAD_SECONDS,
        )
        self.loop.recording = files.entries[0]

    def run(self) -> tuple[LiveResult, list[dict]]:
        """(result, UI entries of the finished recording). Cancel propagates after the MP4 is finished."""
        LIVE_SESSIONS.add(self.loop)
        try:
            result = self.loop.run()
        finally:
            LIVE_SESSIONS.finish(self.loop)
            self.sender.close()
            entries = self.files.close()
        if result.images is None or not entries:
            raise RuntimeError("the live run was stopped before its first chunk was ready: nothing to return")
        return result, entries


def page_sender(sid: str | None = None) -> Callable[[str, dict], None]:
    """Events to the browser that queued the prompt (all browsers for prompts queued without one)."""
    server = comfy.module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return lambda event, payload: None
    sid = sid if sid is not None else getattr(instance, "client_id", None)
    return lambda event, payload: instance.send_sync(event, payload, sid)


def _entry_path(entries: list[dict]) -> tuple[str, str]:
    entry = entries[0]
    return entry["subfolder"], entry["filename"]


def _video_output(path: str):
    """ComfyUI's VIDEO for the recording (None outside ComfyUI)."""
    api = comfy.module("comfy_api.latest")
    impl = getattr(api, "InputImpl", None)
    return impl.VideoFromFile(path) if impl is not None else None


def _register_routes() -> None:
    server = comfy.module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        register_routes(instance.routes)


_register_routes()

NODE_CLASS_MAPPINGS = {"RewardForcingLive": RewardForcingLive}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardForcingLive": "Reward Forcing: Live"}
