"""Stream Generate: one whole video, chunk by chunk, with a preview per chunk and Cancel per model pass.

It may open with a start image or a video to extend (prefilled, see prefix.py) and follow a Prompt
Timeline (prompt switches at times) instead of, or after, one ``positive`` prompt.
"""

from __future__ import annotations

from rf_core.config import StreamConfig
from rf_core.stream import StreamSession
from rf_core.timeline import prefill_chunks
from rf_core.vae.latent_format import to_comfy_latent

from .. import comfy
from ..common import (
    CATEGORY,
    WAN_FPS,
    batch_widget,
    check_length,
    check_size,
    denoise_steps,
    fps_widget,
    latent_frames_for,
    latent_hw,
    length_text,
    model_input,
    refuse,
    requested_frames,
    seed_widget,
    size_widget,
    steps_widget,
    stream_settings_input,
    stream_state_bytes,
)
from ..conditioning import prompt_embeds, repeat_prompts
from ..model_handle import RFModel
from ..prompts.timeline import cue_chunks, schedule
from ..video.files import VideoFiles, video_ui
from .decoders import decoder_stream
from .prefix import needs_encoder, prefix_latent_count, read_prefix
from .record import StreamRecord


def check_model(model) -> RFModel:
    if not isinstance(model, RFModel):
        raise ValueError(
            f"model: expected an RF_MODEL from 'Reward Forcing: Load Model', got {type(model).__name__} "
            "(a native MODEL from Load Diffusion Model cannot stream)"
        )
    return model


def stream_config(settings: StreamConfig | None, steps: int) -> StreamConfig:
    if settings is not None and not isinstance(settings, StreamConfig):
        raise ValueError(
            f"settings: expected RF_STREAM_CONFIG from EMA-Sink Settings, got {type(settings).__name__}"
        )
    return (settings or StreamConfig()).replace(denoise_steps=denoise_steps(steps))


def stream_inputs(
    model, settings: StreamConfig | None, steps: int, width: int, height: int
) -> tuple[RFModel, StreamConfig, tuple[int, int]]:
    """The checked model, stream settings and latent (height, width) that every streaming node starts from."""
    return check_model(model), stream_config(settings, steps), latent_hw(width, height)


def video_length(config: StreamConfig, length: float, length_unit: str, fps: float, prefix: int = 0) -> int:
    """Latent frames to generate for the length asked (after a prefix of ``prefix`` latent frames, the
    length of the new video); refuses a length the settings cannot stream."""
    frames = latent_frames_for(length, length_unit, config.chunk_frames, fps, prefix)
    if config.sink_policy == "global" and prefix + frames > config.max_frames:
        opening = f"{prefix} of the start image or extended video and " if prefix else ""
        raise ValueError(
            f"the 'global' sink policy holds at most max_frames={config.max_frames} latent frames but "
            f"this length needs {opening}{frames}: shorten the video, raise max_frames, or use the 'ema' policy"
        )
    return frames


SAVE_NEEDS_FRAMES = "saving an MP4 needs decoded frames: connect a VAE or a decoder, or clear filename_prefix"
NEEDS_PROMPT = "connect positive (a prompt) or timeline (Reward Forcing: Prompt Timeline)"

# Inputs ComfyUI evaluates only when check_lazy_status asks for them: loading a model, encoding a
# prompt or loading a VAE takes seconds to minutes, so the cheap checks run before any of it. The
# prompts come first: a timeline's times are checked against the length before the model loads.
PROMPT_INPUTS = ("positive", "timeline")
LAZY_INPUTS = ("model", "positive", "timeline", "vae", "decoder")


def lazy(spec: tuple) -> tuple:
    return (spec[0], {**spec[1], "lazy": True})


def pending_inputs(inputs: dict, names: tuple[str, ...] = LAZY_INPUTS) -> list[str]:
    """The lazy inputs check_lazy_status must ask for: linked (ComfyUI passes them, as None until
    evaluated) and not evaluated yet. Unconnected optional inputs are not passed at all."""
    return [name for name in names if name in inputs and inputs[name] is None]


def prefix_input_types() -> dict:
    """The start_image and extend inputs of the streaming nodes."""
    return {
        "start_image": (
            "IMAGE",
            {
                "tooltip": "Image to video: the video starts from this image (its first frame). Resized to cover "
                "width x height and centre-cropped. Needs the Wan VAE (vae, or Load Decoder's Wan VAE) to "
                "encode it."
            },
        ),
        "extend": (
            "LATENT,IMAGE",
            {
                "tooltip": "A video to continue: its frames open the output and the stream goes on from them. "
                "A Wan 2.1 LATENT (e.g. from an earlier Stream Generate or VAE Encode; same size as the "
                "video), or IMAGE frames (e.g. Load Video -> Get Video Components), resized and encoded "
                "with the Wan VAE; 1 + 4k frames are used (the first 1 to 3 are left out otherwise)."
            },
        ),
    }


def check_prefix_inputs(start_image, extend, width: int, height: int, has_encoder: bool) -> int:
    """Cheap checks of the start image / extension (no encoding); returns their latent frames."""
    frames = prefix_latent_count(start_image, extend, latent_hw(width, height), None)
    what = needs_encoder(start_image, extend)
    if what is not None and not has_encoder:
        raise ValueError(
            f"{what} must be encoded with the Wan 2.1 VAE: connect Load VAE (wan_2.1_vae.safetensors) to vae, "
            "or Reward Forcing: Load Decoder with that file to decoder"
        )
    return frames


class RewardForcingStreamGenerate:
    DESCRIPTION = (
        "Generate a video chunk by chunk (12 frames each) with the causal model. Outputs a Wan 2.1 LATENT "
        "(native VAE Decode takes it) and, with a VAE or decoder connected, the frames, decoded as each chunk "
        "arrives; with a filename prefix the MP4 is written as chunks arrive too."
    )
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    OUTPUT_NODE = True  # it can save the MP4 itself, so it may run with no output connected
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "images")
    OUTPUT_TOOLTIPS = (
        "Wan 2.1 latent video [B, 16, T, H/8, W/8] in raw VAE space, for VAE Decode and other Wan nodes.",
        "Decoded frames when a VAE or decoder is connected, otherwise a rough preview (one image per latent frame).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": lazy(model_input()),
                "seed": seed_widget("Noise seed; the same seed and settings give the same video."),
                "length": (
                    "FLOAT",
                    {
                        "default": 5.0,
                        "min": 0.0,
                        "max": 100000.0,
                        "step": 0.25,
                        "tooltip": "Video length, rounded up to whole chunks (the first gives 9 frames, "
                        "each next one 12): 5 s = 81 frames, 477 frames = 30 s in the reference. The node "
                        "shows the length it makes.",
                    },
                ),
                "length_unit": (["seconds", "frames"], {"default": "seconds", "tooltip": "Unit of length."}),
                "width": size_widget(832, "width"),
                "height": size_widget(480, "height"),
                "steps": steps_widget(),
            },
            "optional": {
                "positive": lazy(
                    (
                        "CONDITIONING",
                        {
                            "tooltip": "Prompt from CLIPTextEncode with the umT5 text encoder (CLIPLoader type "
                            "'wan'), or from Load Prompt Embeddings. Needed unless a timeline gives the opening "
                            "prompt."
                        },
                    )
                ),
                "timeline": lazy(
                    (
                        "RF_TIMELINE",
                        {
                            "tooltip": "Prompts at times (Prompt Timeline): the prompt switches as the video "
                            "goes on. Its line at 0s opens the video, or positive does."
                        },
                    )
                ),
                **prefix_input_types(),
                "settings": stream_settings_input(),
                "vae": lazy(
                    (
                        "VAE",
                        {
                            "tooltip": "ComfyUI Wan 2.1 VAE (Load VAE): exact frames, chunk by chunk; also "
                            "encodes start_image and extend frames."
                        },
                    )
                ),
                "decoder": lazy(
                    ("RF_DECODER", {"tooltip": "Our decoder (Load Decoder), e.g. TAEHV for fast previews."})
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "If set, an MP4 is written to the output folder as chunks arrive "
                        "(needs a VAE or decoder). Empty: no file.",
                    },
                ),
                "fps": fps_widget("Frame rate of the video (Wan: 16); also converts seconds to frames."),
                "batch": batch_widget(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, length=None):
        # Naming an input here switches off ComfyUI's own min/max check for it, so check those too.
        return refuse(check_size(width, height), check_length(length))

    def check_lazy_status(
        self,
        length: float,
        length_unit: str,
        width: int,
        height: int,
        steps: int,
        settings: StreamConfig | None = None,
        start_image=None,
        extend=None,
        filename_prefix: str = "",
        fps: float = WAN_FPS,
        **inputs,
    ) -> list[str]:
        # The settings node's values are unknown at queue time (linked inputs reach VALIDATE_INPUTS as
        # None), so a length they cannot stream is refused here, before the model is loaded.
        config = stream_config(settings, steps)
        if not any(name in inputs for name in PROMPT_INPUTS):
            raise ValueError(NEEDS_PROMPT)
        has_decoder = "vae" in inputs or "decoder" in inputs
        prefix = check_prefix_inputs(start_image, extend, width, height, has_decoder)
        chunks = video_length(config, length, length_unit, fps, prefix) // config.chunk_frames
        if filename_prefix.strip() and not has_decoder:
            raise ValueError(SAVE_NEEDS_FRAMES)
        prompts = pending_inputs(inputs, PROMPT_INPUTS)
        if prompts:
            return prompts
        if inputs.get("timeline") is not None:  # its times against the length, before the model loads
            cue_chunks(
                inputs["timeline"],
                "positive" in inputs,
                fps=fps,
                chunk_frames=config.chunk_frames,
                prefix=prefix,
                chunks=chunks,
            )
        return pending_inputs(inputs)

    def generate(
        self,
        model,
        seed: int,
        length: float,
        length_unit: str,
        width: int,
        height: int,
        steps: int,
        positive=None,
        timeline=None,
        start_image=None,
        extend=None,
        settings: StreamConfig | None = None,
        vae=None,
        decoder=None,
        filename_prefix: str = "",
        fps: float = WAN_FPS,
        batch: int = 1,
        unique_id: str | None = None,
    ):
        model, config, hw = stream_inputs(model, settings, steps, width, height)
        cfg = model.cfg
        given = (
            None
            if positive is None
            else repeat_prompts(prompt_embeds(positive, cfg.text_dim, cfg.text_len), batch)
        )
        videos = batch if given is None else given.shape[0]
        prefix_size = prefix_latent_count(start_image, extend, hw, videos)
        frames = video_length(config, length, length_unit, fps, prefix_size)
        chunks = frames // config.chunk_frames
        opening, switches = schedule(
            timeline,
            given,
            fps=fps,
            chunk_frames=config.chunk_frames,
            prefix=prefix_size,
            chunks=chunks,
            text_dim=cfg.text_dim,
            text_len=cfg.text_len,
        )
        if given is None:
            opening = repeat_prompts(opening, batch)
        decode, _ = decoder_stream(vae, decoder)
        if filename_prefix.strip() and decode is None:
            raise ValueError(SAVE_NEEDS_FRAMES)
        prefix = read_prefix(start_image, extend, vae, decoder, width, height, videos)  # encodes frames
        text = length_text(frames, fps, requested_frames(length, length_unit, fps), videos, prefix_size)
        comfy.progress_text(text, unique_id)
        dit = model.acquire(stream_state_bytes(model.cfg, config, hw, videos, model.dit.dtype))
        stream = StreamSession(dit, opening, hw, config, seed=seed, interrupt=comfy.interrupt_check())
        record = StreamRecord(stream, decode)
        record.prepare = model.acquire
        per, pre = record.passes_per_chunk(), record.prefill_steps(prefix_size)
        progress = comfy.Progress(pre + chunks * per, unique_id)
        files = VideoFiles(filename_prefix, fps, videos, width, height) if filename_prefix.strip() else None
        sink = files.write if files else None
        try:
            if prefix is not None:
                record.prefill(prefix.latents, prefix.frames, progress, sink)
            for start, stop, switch in _segments(
                switches, prefill_chunks(prefix_size, config.chunk_frames), chunks
            ):
                if switch is not None:
                    stream.set_prompt(switch.embeds, recache=switch.recache)
                record.advance(stop - start, progress, sink, offset=pre + start * per)
        finally:
            entries = files.close() if files else []
        out = comfy.intermediate_device()
        latent = {"samples": to_comfy_latent(record.latent()).to(out)}
        notes = prefix.notes if prefix is not None else []
        return {
            "ui": {**video_ui(entries), "text": [text, *notes]},
            "result": (latent, record.images().to(out)),
        }


def _segments(switches: dict, opening: int, chunks: int) -> list[tuple[int, int, object]]:
    """(first, end, switch or None) runs of generated chunks between prompt switches. ``switches`` are
    keyed by chunk of the stream, whose first ``opening`` chunks are the prefill's."""
    at = {chunk - opening: switch for chunk, switch in switches.items()}
    starts = sorted({0, *at})
    ends = [*starts[1:], chunks]
    return [(a, b, at.get(a)) for a, b in zip(starts, ends)]


NODE_CLASS_MAPPINGS = {"RewardForcingStreamGenerate": RewardForcingStreamGenerate}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardForcingStreamGenerate": "Reward Forcing: Stream Generate"}
