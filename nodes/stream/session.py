"""Stream Session: an interactive stream that every queue run continues by a few chunks, and its free node."""

from __future__ import annotations

import logging

import torch

from rf_core.config import StreamConfig
from rf_core.stream import StreamSession
from rf_core.vae.latent_format import to_comfy_latent

from .. import comfy
from ..common import (
    CATEGORY,
    batch_widget,
    check_size,
    model_input,
    recache_widget,
    refuse,
    seed_widget,
    size_widget,
    steps_widget,
    stream_settings_input,
    stream_state_bytes,
)
from ..conditioning import prompt_embeds, repeat_prompts
from .decoders import decoder_stream
from .generate import prefix_input_types, stream_inputs
from .prefix import prefix_key, read_prefix
from .record import StreamRecord
from .registry import REGISTRY, Session

log = logging.getLogger("reward_forcing")

OUTPUT_CHOICES = ("new frames", "whole video")


class RewardForcingStreamSession:
    DESCRIPTION = (
        "An interactive stream: each queue run continues the same video by a few chunks with the prompt "
        "connected now (change the prompt between runs to steer it). It may open with a start image or a video "
        "to extend. State is kept per session id, also while other workflows run; use Free Session (or reset) "
        "when done."
    )
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("LATENT", "IMAGE")  # the order of every generator node
    RETURN_NAMES = ("latent", "images")
    OUTPUT_TOOLTIPS = (
        "Wan 2.1 latent [B, 16, T, H/8, W/8] (raw VAE space) of this run's chunks (or of the whole video so "
        "far, see output).",
        "The same frames: decoded with a VAE/decoder, else a rough preview per latent frame.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "positive": (
                    "CONDITIONING",
                    {
                        "tooltip": "The prompt for this run's chunks; a new prompt steers the stream from here on."
                    },
                ),
                "session_id": (
                    "STRING",
                    {
                        "default": "stream-1",
                        "tooltip": "Name of the stream; runs with the same id continue it.",
                    },
                ),
                "chunks": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 1000,
                        "tooltip": "Chunks to add per run (one chunk = 3 latent frames = 12 video frames = 0.75 s).",
                    },
                ),
                "width": size_widget(832, "width"),
                "height": size_widget(480, "height"),
                "seed": seed_widget("Noise seed, used when the session starts or is reset."),
                "steps": steps_widget(),
                "recache": recache_widget("change"),
                "reset": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Start the stream over (turn off again to keep continuing).",
                    },
                ),
                "output": (
                    list(OUTPUT_CHOICES),
                    {
                        "default": OUTPUT_CHOICES[0],
                        "tooltip": "Return this run's new frames or the whole video so far.",
                    },
                ),
            },
            "optional": {
                **prefix_input_types(),
                "settings": stream_settings_input(),
                "vae": (
                    "VAE",
                    {
                        "tooltip": "ComfyUI Wan 2.1 VAE: frames decoded exactly and seamlessly across runs; "
                        "also encodes start_image and extend frames."
                    },
                ),
                "decoder": ("RF_DECODER", {"tooltip": "Our decoder (Load Decoder), e.g. TAEHV for speed."}),
                "batch": batch_widget(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **_widgets):
        return float("nan")  # every queue run continues the stream, even with unchanged inputs

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, session_id=None):
        empty = session_id is not None and not session_id.strip()
        return refuse(
            check_size(width, height),
            "session_id is empty: give the stream a name such as 'stream-1'" if empty else None,
        )

    def run(
        self,
        model,
        positive,
        session_id: str,
        chunks: int,
        width: int,
        height: int,
        seed: int,
        steps: int,
        recache: bool = True,
        reset: bool = False,
        output: str = OUTPUT_CHOICES[0],
        start_image=None,
        extend=None,
        settings: StreamConfig | None = None,
        vae=None,
        decoder=None,
        batch: int = 1,
        unique_id: str | None = None,
    ):
        model, config, hw = stream_inputs(model, settings, steps, width, height)
        if chunks < 1:
            raise ValueError(f"chunks must be at least 1, got {chunks}")
        if output not in OUTPUT_CHOICES:
            raise ValueError(f"output must be one of {OUTPUT_CHOICES}, got {output!r}")
        embeds = repeat_prompts(prompt_embeds(positive, model.cfg.text_dim, model.cfg.text_len), batch)
        decode, decoder_key = decoder_stream(vae, decoder)
        batch = embeds.shape[0]
        # The start image / extension opens the stream: another one starts it over, like other settings.
        settings_key = (model.identity, hw, config, batch, prefix_key(start_image, extend))

        session = REGISTRY.get(session_id)
        if session is not None and not reset and session.settings != settings_key:
            log.warning(
                "Reward Forcing session %r: model, size, batch, stream settings, start image or extended video "
                "changed; starting over",
                session_id,
            )
            comfy.progress_text("settings changed: new stream", unique_id)
            reset = True
        starting = session is None or reset
        prefix = read_prefix(start_image, extend, vae, decoder, width, height, batch) if starting else None
        dit = model.acquire(stream_state_bytes(model.cfg, config, hw, batch, model.dit.dtype))
        if starting:
            REGISTRY.free(session_id)  # let the old state go before the new one is allocated
            session = None
            stream = StreamSession(dit, embeds, hw, config, seed=seed)
            session = Session(
                session_id, StreamRecord(stream, decode, torch.uint8), settings_key, decoder_key, embeds
            )
        else:
            stream = session.record.stream
            if decoder_key != session.decoder_key:
                session.record.set_decoder(decode)  # frames so far are decoded again by the new decoder
                session.decoder_key = decoder_key
            elif hasattr(session.record.decoder, "rebind"):
                session.record.decoder.rebind(decode)
        session.model = model  # keeps the loaded weights alive (and shared) while the session lives
        stream.interrupt = comfy.interrupt_check()
        if not torch.equal(embeds, session.prompt):
            stream.set_prompt(embeds, recache=recache)
            session.prompt = embeds  # only once the switch (and re-cache) went through

        record = session.record
        record.prepare = model.acquire
        first = record.chunks
        pre = record.prefill_steps(prefix.latents.shape[1]) if prefix is not None else 0
        progress = comfy.Progress(pre + chunks * record.passes_per_chunk(), unique_id)
        if prefix is not None:
            record.prefill(prefix.latents, prefix.frames, progress)
        if starting:
            REGISTRY.put(session)  # once its opening went through: a cancelled prefill starts over next run
        record.decode_pending()  # chunks a failed decode left without frames
        record.advance(chunks, progress, offset=pre)
        REGISTRY.enforce_cap(keep=session_id)
        comfy.progress_text(
            f"{session_id}: {stream.frames_done} latent frames, {sum(record.frame_chunks)} frames", unique_id
        )

        start = first if output == OUTPUT_CHOICES[0] else 0
        out = comfy.intermediate_device()
        latent = {"samples": to_comfy_latent(record.latent(start)).to(out)}
        return (latent, record.images(start).to(out))


class RewardForcingFreeSession:
    DESCRIPTION = "Free a stream session's memory (KV cache, frames so far), or all sessions."
    CATEGORY = CATEGORY
    FUNCTION = "free"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "session_id": ("STRING", {"default": "stream-1", "tooltip": "The session to free."}),
                "all_sessions": ("BOOLEAN", {"default": False, "tooltip": "Free every session instead."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **_widgets):
        return float("nan")

    def free(self, session_id: str, all_sessions: bool = False):
        if all_sessions:
            text = f"freed {REGISTRY.free_all()} sessions"
        elif REGISTRY.free(session_id):
            text = f"freed session {session_id!r}"
        else:
            text = f"no session {session_id!r} (open: {', '.join(REGISTRY.ids()) or 'none'})"
        comfy.empty_cache()
        return {"ui": {"text": [text]}}


NODE_CLASS_MAPPINGS = {
    "RewardForcingStreamSession": RewardForcingStreamSession,
    "RewardForcingFreeSession": RewardForcingFreeSession,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardForcingStreamSession": "Reward Forcing: Stream Session",
    "RewardForcingFreeSession": "Reward Forcing: Free Session",
}
