"""Stream Generate: one whole video, chunk by chunk, with a preview per chunk and Cancel per model pass."""

from __future__ import annotations

from rf_core.config import StreamConfig
from rf_core.stream import StreamSession
from rf_core.vae.latent_format import to_comfy_latent

from .. import comfy
from ..common import (
    CATEGORY,
    WAN_FPS,
    check_size,
    denoise_steps,
    fps_widget,
    latent_frames_for,
    latent_hw,
    model_input,
    seed_widget,
    size_widget,
    steps_widget,
    stream_settings_input,
    stream_state_bytes,
)
from ..conditioning import prompt_embeds
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
                "model": model_input(),
                "positive": (
                    "CONDITIONING",
                    {
                        "tooltip": "Prompt from CLIPTextEncode with the umT5 text encoder (CLIPLoader type 'wan'), "
                        "or from Load Prompt Embeddings."
                    },
                ),
                "seed": seed_widget("Noise seed; the same seed and settings give the same video."),
                "length": (
                    "FLOAT",
                    {
                        "default": 5.0,
                        "min": 0.0,
                        "max": 100000.0,
                        "step": 0.25,
                        "tooltip": "Video length, rounded to whole chunks of 12 frames (5 s = 81 frames, 30 s = 477).",
                    },
                ),
                "length_unit": (["seconds", "frames"], {"default": "seconds", "tooltip": "Unit of length."}),
                "width": size_widget(832, "width"),
                "height": size_widget(480, "height"),
                "steps": steps_widget(),
            },
            "optional": {
                "settings": stream_settings_input(),
                "vae": (
                    "VAE",
                    {"tooltip": "ComfyUI Wan 2.1 VAE (Load VAE): frames decoded exactly, chunk by chunk."},
                ),
                "decoder": (
                    "RF_DECODER",
                    {"tooltip": "Our decoder (Load Decoder), e.g. TAEHV for fast previews."},
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
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, length=None):
        # Naming an input here switches off ComfyUI's own min/max check for it, so check those too.
        error = check_size(width, height)
        if error:
            return error
        if length is not None and length <= 0:
            return f"length must be more than 0, got {length}"
        return True

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
        unique_id: str | None = None,
    ):
        model, config, hw = stream_inputs(model, settings, steps, width, height)
        frames = latent_frames_for(length, length_unit, config.chunk_frames, fps)
        if config.sink_policy == "global" and frames > config.max_frames:
            raise ValueError(
                f"the 'global' sink policy holds at most max_frames={config.max_frames} latent frames but "
                f"this length needs {frames}: shorten the video, raise max_frames, or use the 'ema' policy"
            )
        embeds = prompt_embeds(positive, model.cfg.text_dim, model.cfg.text_len)
        decode, _ = decoder_stream(vae, decoder)
        if filename_prefix.strip() and decode is None:
            raise ValueError(
                "saving an MP4 needs decoded frames: connect a VAE or a decoder, or clear filename_prefix"
            )
        batch = embeds.shape[0]
        dit = model.acquire(stream_state_bytes(model.cfg, config, hw, batch, model.dit.dtype))
        stream = StreamSession(dit, embeds, hw, config, seed=seed, interrupt=comfy.interrupt_check())
        record = StreamRecord(stream, decode)
        record.prepare = model.acquire
        chunks = frames // config.chunk_frames
        progress = comfy.Progress(chunks * record.passes_per_chunk(), unique_id)
        files = VideoFiles(filename_prefix, fps, batch, width, height) if filename_prefix.strip() else None
        try:
            record.advance(chunks, progress, files.write if files else None)
        finally:
            entries = files.close() if files else []
        out = comfy.intermediate_device()
        latent = {"samples": to_comfy_latent(record.latent()).to(out)}
        return {"ui": video_ui(entries), "result": (latent, record.images().to(out))}


NODE_CLASS_MAPPINGS = {"RewardForcingStreamGenerate": RewardForcingStreamGenerate}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardForcingStreamGenerate": "Reward Forcing: Stream Generate"}
