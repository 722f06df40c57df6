"""Stream Generate: one whole video, chunk by chunk, with a preview per chunk and Cancel per model pass."""

from __future__ import annotations

from rf_core.config import StreamConfig
from rf_core.stream import StreamSession
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
from ..video.files import VideoFiles, video_ui
from .decoders import decoder_stream
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


def video_length(config: StreamConfig, length: float, length_unit: str, fps: float) -> int:
    """Latent frames of the video asked for; refuses a length the settings cannot stream."""
    frames = latent_frames_for(length, length_unit, config.chunk_frames, fps)
    if config.sink_policy == "global" and frames > config.max_frames:
        raise ValueError(
            f"the 'global' sink policy holds at most max_frames={config.max_frames} latent frames but "
            f"this length needs {frames}: shorten the video, raise max_frames, or use the 'ema' policy"
        )
    return frames


SAVE_NEEDS_FRAMES = "saving an MP4 needs decoded frames: connect a VAE or a decoder, or clear filename_prefix"

# Inputs ComfyUI evaluates only when check_lazy_status asks for them: loading a model, encoding a
# prompt or loading a VAE takes seconds to minutes, so the cheap checks run before any of it.
LAZY_INPUTS = ("model", "positive", "vae", "decoder")


def lazy(spec: tuple) -> tuple:
    return (spec[0], {**spec[1], "lazy": True})


def pending_inputs(inputs: dict) -> list[str]:
    """The lazy inputs check_lazy_status must ask for: linked (ComfyUI passes them, as None until
    evaluated) and not evaluated yet. Unconnected optional inputs are not passed at all."""
    return [name for name in LAZY_INPUTS if name in inputs and inputs[name] is None]


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
                "positive": lazy(
                    (
                        "CONDITIONING",
                        {
                            "tooltip": "Prompt from CLIPTextEncode with the umT5 text encoder (CLIPLoader type "
                            "'wan'), or from Load Prompt Embeddings."
                        },
                    )
                ),
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
                "settings": stream_settings_input(),
                "vae": lazy(
                    ("VAE", {"tooltip": "ComfyUI Wan 2.1 VAE (Load VAE): exact frames, chunk by chunk."})
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
        steps: int,
        settings: StreamConfig | None = None,
        filename_prefix: str = "",
        fps: float = WAN_FPS,
        **inputs,
    ) -> list[str]:
        # The settings node's values are unknown at queue time (linked inputs reach VALIDATE_INPUTS as
        # None), so a length they cannot stream is refused here, before the model is loaded.
        video_length(stream_config(settings, steps), length, length_unit, fps)
        if filename_prefix.strip() and "vae" not in inputs and "decoder" not in inputs:
            raise ValueError(SAVE_NEEDS_FRAMES)
        return pending_inputs(inputs)

    def generate(
        self,
        model,
        positive,
        seed: int,
        length: float,
        length_unit: str,
        width: int,
        height: int,
        steps: int,
        settings: StreamConfig | None = None,
        vae=None,
        decoder=None,
        filename_prefix: str = "",
        fps: float = WAN_FPS,
        batch: int = 1,
        unique_id: str | None = None,
    ):
        model, config, hw = stream_inputs(model, settings, steps, width, height)
        frames = video_length(config, length, length_unit, fps)
        embeds = repeat_prompts(prompt_embeds(positive, model.cfg.text_dim, model.cfg.text_len), batch)
        decode, _ = decoder_stream(vae, decoder)
        if filename_prefix.strip() and decode is None:
            raise ValueError(SAVE_NEEDS_FRAMES)
        videos = embeds.shape[0]
        text = length_text(frames, fps, requested_frames(length, length_unit, fps), videos)
        comfy.progress_text(text, unique_id)
        dit = model.acquire(stream_state_bytes(model.cfg, config, hw, videos, model.dit.dtype))
        stream = StreamSession(dit, embeds, hw, config, seed=seed, interrupt=comfy.interrupt_check())
        record = StreamRecord(stream, decode)
        record.prepare = model.acquire
        chunks = frames // config.chunk_frames
        progress = comfy.Progress(chunks * record.passes_per_chunk(), unique_id)
        files = VideoFiles(filename_prefix, fps, videos, width, height) if filename_prefix.strip() else None
        try:
            record.advance(chunks, progress, files.write if files else None)
        finally:
            entries = files.close() if files else []
        out = comfy.intermediate_device()
        latent = {"samples": to_comfy_latent(record.latent()).to(out)}
        return {"ui": {**video_ui(entries), "text": [text]}, "result": (latent, record.images().to(out))}


NODE_CLASS_MAPPINGS = {"RewardForcingStreamGenerate": RewardForcingStreamGenerate}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardForcingStreamGenerate": "Reward Forcing: Stream Generate"}
