"""StreamSession: the Reward Forcing chunk loop, with all state carried between chunks.

Per chunk (reference-algorithm.md §4.3): start from noise, run the warped denoising steps
(1000, 937.5, 833.3, 625 by default) with fresh noise between steps, return the clean latent, then
run one more pass at t = 0 on it to write clean keys/values into the KV cache.

Latents are in model space (normalised Wan latents), frame-major: [B, frames, 16, h, w].
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

from rf_core.config import StreamConfig
from rf_core.graphs import PassGraphs
from rf_core.model.dit import WanDiT
from rf_core.model.kv_cache import CacheFullError, SinkKVCache
from rf_core.schedule import FlowSchedule


class StreamSession:
    """One stream of video latents.

    Args:
        model: the causal student (any ``WanDiT``; it is not modified).
        prompt_embeds: [B or 1, tokens <= text_len, text_dim] umT5 embeddings (zeros after EOS).
        latent_hw: latent height and width (pixels / 8), multiples of 2.
        config: chunking, steps and sink policy.
        seed: sample i of the batch draws its noise from its own generator seeded ``seed + i``, so a
            batch equals single runs with consecutive seeds. The global RNG is never used.
        batch: batch size (default: the prompt batch).
        interrupt: called before every model pass; raise from it to cancel (e.g. ComfyUI's
            ``throw_exception_if_processing_interrupted``). A cancelled chunk leaves the session as
            it was before that chunk: calling ``next_chunk`` again produces the same chunk.
        on_pass: called after every denoising pass with (pass index, denoising passes per chunk), for
            progress bars.
        key_storage: "raw" (the reference: un-roped keys, the window re-roped on every pass) or
            "roped" (keys kept roped, see ``SinkKVCache``); default: the model's ``key_storage``
            (``make_fast`` switches it to "roped").
        cuda_graphs: replay repeating passes as CUDA graphs (CUDA only; default: the model's
            ``cuda_graphs``, see ``make_fast``).
        cache_dtype: dtype of the KV cache and the noise (default: the model's), e.g. bf16 for
            training under autocast with float32 master weights.

    ``next_chunk`` returns a chunk before its cache-refresh pass, which runs at the start of the next
    chunk (or on ``flush``): the latents reach the decoder one pass sooner and a stream's last refresh,
    which nothing would read, is never run.
    """

    def __init__(
        self,
        model: WanDiT,
        prompt_embeds: torch.Tensor,
        latent_hw: tuple[int, int],
        config: StreamConfig | None = None,
        seed: int = 0,
        batch: int | None = None,
        interrupt: Callable[[], None] | None = None,
        on_pass: Callable[[int, int], None] | None = None,
        key_storage: str | None = None,
        cuda_graphs: bool | None = None,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.config = config or StreamConfig()
        self.interrupt = interrupt
        self.on_pass = on_pass
        cfg = model.cfg
        h, w = latent_hw
        pt, ph, pw = cfg.patch_size
        if h <= 0 or w <= 0 or h % ph or w % pw:
            raise ValueError(
                f"latent size {h}x{w} must be positive multiples of {ph}x{pw} "
                f"(video size a multiple of {8 * ph}x{8 * pw} pixels)"
            )
        if self.config.chunk_frames % pt:
            raise ValueError(f"chunk_frames {self.config.chunk_frames} must be a multiple of {pt}")
        self.latent_hw = (h, w)
        self.grid_hw = (h // ph, w // pw)
        self.batch = batch or prompt_embeds.shape[0]
        self.device = model.device
        self.dtype = cache_dtype or model.dtype
        self.schedule = FlowSchedule(self.config.shift)
        steps = self.config.denoise_steps
        self.timesteps = self.schedule.warp(steps) if self.config.warp_steps else [float(s) for s in steps]
        self.cache = SinkKVCache(
            cfg.num_layers,
            self.batch,
            self.grid_hw[0] * self.grid_hw[1],
            cfg.num_heads,
            cfg.head_dim,
            self.config,
            self.device,
            self.dtype,
            key_storage=key_storage or model.key_storage,
            rope_dtype=model.rope.dtype,
            fused=model.compiled,
            storage_dtype=model.kv_dtype,
        )
        use_graphs = model.cuda_graphs if cuda_graphs is None else cuda_graphs
        if use_graphs and getattr(model, "offload", None) is not None:
            raise ValueError(
                "cuda_graphs cannot replay a model whose blocks are offloaded (the low-vram profile): "
                "the copies that bring each block in depend on host-side state a graph cannot see"
            )
        self.graphs = PassGraphs(model) if use_graphs and self.device.type == "cuda" else None
        self.seed = seed
        self._prompt: torch.Tensor
        self._cross: list | None = None
        self._cross_stale = True
        self._deferred: tuple[torch.Tensor, tuple[int, int]] | None = None
        self._recache_due = False
        self._window_recached = False  # the pending chunk's window was re-cached (see set_prompt)
        self.set_prompt(prompt_embeds)
        self.reset(seed)

    # ------------------------------------------------------------------ state
    def reset(self, seed: int | None = None) -> None:
        """Start a new stream (same prompt, new or same seed)."""
        if seed is not None:
            self.seed = seed
        self.cache.reset()
        self._deferred = None
        self._recache_due = False
        self._window_recached = False
        gen_device = self.device if self.device.type != "meta" else "cpu"
        self.generators = [torch.Generator(gen_device).manual_seed(self.seed + i) for i in range(self.batch)]
        self._chunk_rng: list[torch.Tensor] | None = None
        # clean latents of the frames still in the window, for re-caching on a prompt switch
        self.recent: deque[tuple[int, torch.Tensor]] = deque(maxlen=self.config.cache_frames)

    @property
    def frames_done(self) -> int:
        """Latent frames generated so far."""
        return self.cache.next_frame + (0 if self._deferred is None else self._deferred[0].shape[1])

    def flush(self) -> None:
        """Run the deferred cache refresh of the last chunk now (``next_chunk`` does it when needed)."""
        if self._deferred is not None:
            self.finish_chunk(*self._deferred)
            self._deferred = None

    def state_nbytes(self) -> int:
        n = self.cache.nbytes + sum(x.numel() * x.element_size() for _, x in self.recent)
        if self._cross is not None:
            n += sum(k.numel() * k.element_size() * 2 for k, _ in self._cross)
        return n

    def set_prompt(self, prompt_embeds: torch.Tensor, recache: bool = False) -> None:
        """Switch the prompt for the next chunk. The cross-attention cache is rebuilt. With
        ``recache`` (LongLive-style), the clean frames the next chunk attends to in its window (not the
        sink, which may be a blend) are run again under the new prompt at t = 0 so their keys follow
        the new prompt. The re-cache pass runs at the start of the next chunk, after that chunk's
        eviction: frames about to leave the window are not re-run, in the default configuration the
        pass has the shape of a chunk (so compiled models and CUDA graphs reuse theirs), and a chunk
        abandoned part-way for a switch leaves the session exactly as a switch between chunks would.
        The latest call decides whether the re-cache runs, except after a chunk abandoned once its window
        was re-cached: the old keys are gone, so the window is re-cached under the newest prompt."""
        cfg = self.model.cfg
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"prompt embeddings must be [B, tokens, {cfg.text_dim}] for this model, got {list(prompt_embeds.shape)}"
            )
        if prompt_embeds.shape[1] > cfg.text_len:
            raise ValueError(
                f"prompt embeddings have {prompt_embeds.shape[1]} tokens; the model takes at most {cfg.text_len}"
            )
        if prompt_embeds.shape[0] not in (1, getattr(self, "batch", prompt_embeds.shape[0])):
            raise ValueError(
                f"prompt batch {prompt_embeds.shape[0]} does not match the session batch {self.batch}"
            )
        self.flush()  # the pending refresh belongs to the old prompt
        self._prompt = prompt_embeds.to(self.device, self.dtype).expand(self.batch, -1, -1)
        self._cross_stale = True
        # A chunk abandoned after its window was re-cached cannot get the old keys back: re-cache again.
        self._recache_due = recache or self._window_recached

    def _cross_kv(self) -> list:
        if torch.is_grad_enabled():
            return self.model.cross_kv(self._prompt)
        if self._cross_stale:
            fresh = self.model.cross_kv(self._prompt)
            if self.graphs is not None and self._cross is not None:
                for (k, v), (nk, nv) in zip(self._cross, fresh):  # captured graphs read these buffers
                    k.copy_(nk)
                    v.copy_(nv)
            else:
                self._cross = fresh
            self._cross_stale = False
        return self._cross

    # ------------------------------------------------------------------ passes
    def _pass(
        self, x: torch.Tensor, t: float, slot: tuple[int, int], need_output: bool = True, eager: bool = False
    ):
        """One model pass of frames x [B, f, C, h, w] sitting in cache slot ``slot``. ``eager`` runs a
        compiled model uncompiled, for one-off shapes that would otherwise trigger a recompilation."""
        if self.interrupt is not None:
            self.interrupt()
        m = self.model
        grid = m.grid(x.permute(0, 2, 1, 3, 4))
        plan = self.cache.plan(slot, m.rope, grid[1], grid[2], m.attn_backend, self.device)
        plan.eager = eager
        cross = self._cross_kv()

        def run(x: torch.Tensor) -> torch.Tensor | None:
            xc = x.permute(0, 2, 1, 3, 4)
            tt = torch.full((x.shape[0], grid[0]), t, device=self.device, dtype=torch.float32)
            e, e0 = m.time_embed(tt, x.shape[0], grid[0])
            out = m.run_blocks(m.patchify(xc), e, e0, cross, plan, grid, need_output)
            return None if out is None else out.permute(0, 2, 1, 3, 4)

        if self.graphs is None or eager or torch.is_grad_enabled():
            return run(x)
        return self.graphs.run((t, slot, need_output, tuple(x.shape)), run, x, keep=plan)

    def _noise(self, n: int) -> torch.Tensor:
        h, w = self.latent_hw
        c = self.model.cfg.in_dim
        return torch.stack(
            [
                torch.randn((n, c, h, w), generator=g, device=g.device, dtype=self.dtype)
                for g in self.generators
            ]
        ).to(self.device)

    @torch.no_grad()
    def _recache(self) -> None:
        """Re-run the committed window frames after the sink under the current prompt (called once the
        next chunk's slot is reserved, i.e. after its eviction)."""
        c = self.cache
        if c.frames <= c.sink:
            return
        ids = c.frame_ids[c.sink : c.frames]
        lat = dict(self.recent)
        if any(i is None or i not in lat for i in ids):
            return  # nothing re-cacheable (e.g. frames were never kept)
        x = torch.stack([lat[i] for i in ids], dim=1)
        # A window of another length than a chunk is a one-off shape: run a compiled model eagerly
        # rather than compile it mid-stream.
        eager = x.shape[1] != self.config.chunk_frames
        self._pass(x, self.config.context_timestep, (c.sink, c.frames), need_output=False, eager=eager)

    def _begin_chunk(self, n: int) -> tuple[int, int]:
        """Reserve the next chunk's slot (evicting), then run a re-cache that ``set_prompt`` left due."""
        slot = self.cache.begin_chunk(n)
        if self._recache_due:  # still due when a cancelled chunk is retried: the pass is redone
            self._recache()
            self._recache_due = False
            self._window_recached = True
        return slot

    def denoise_chunk(
        self,
        noise: torch.Tensor | None = None,
        renoise: Sequence[torch.Tensor] | None = None,
        exit_step: int | None = None,
        grad: bool = False,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Denoise the next chunk without committing it (the caller must call ``finish_chunk``).
        ``exit_step`` stops after that step (self-forcing training rollouts). With ``grad`` the last
        executed step runs with gradients enabled and all earlier steps without; its cache reads use a
        snapshot and it writes nothing, so no gradient reaches other chunks through the cache."""
        self.flush()
        n = self.config.chunk_frames
        if self._chunk_rng is None:
            self._chunk_rng = [g.get_state() for g in self.generators]
        else:  # retrying a cancelled chunk: replay its noise
            for g, s in zip(self.generators, self._chunk_rng):
                g.set_state(s)
        slot = self._begin_chunk(n)
        x = self._noise(n) if noise is None else noise.to(self.device, self.dtype)
        if x.shape != (self.batch, n, self.model.cfg.in_dim, *self.latent_hw):
            raise ValueError(
                f"noise must be {[self.batch, n, self.model.cfg.in_dim, *self.latent_hw]}, got {list(x.shape)}"
            )
        steps = self.timesteps if exit_step is None else self.timesteps[: exit_step + 1]
        x0 = x
        for i, t in enumerate(steps):
            with torch.set_grad_enabled(grad and i + 1 == len(steps)):
                v = self._pass(x, t, slot)
                x0 = self.schedule.x0_from_flow(v, x, t)
            if self.on_pass is not None:
                self.on_pass(i, len(self.timesteps))
            if i + 1 < len(steps):
                eps = self._noise(n) if renoise is None else renoise[i].to(self.device, self.dtype)
                x = self.schedule.add_noise(x0, eps, steps[i + 1])
        return x0, slot

    @torch.no_grad()
    def finish_chunk(self, x0: torch.Tensor, slot: tuple[int, int]) -> None:
        """Context pass on the clean chunk (writes its clean keys/values), then commit it. A chunk
        shorter than ``chunk_frames`` (a prefill remainder) is a one-off shape and runs eagerly."""
        one_off = x0.shape[1] != self.config.chunk_frames
        self._pass(x0.detach(), self.config.context_timestep, slot, need_output=False, eager=one_off)
        first = self.cache.next_frame
        self.cache.commit()
        self._chunk_rng = None
        self._window_recached = False
        for j in range(x0.shape[1]):
            self.recent.append((first + j, x0[:, j].detach()))

    def next_chunk(
        self, noise: torch.Tensor | None = None, renoise: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Generate the next chunk: clean latents [B, chunk_frames, 16, h, w] in model space.
        ``noise`` / ``renoise`` (one tensor per step after the first) replace the generated noise.
        The chunk's cache refresh is deferred (see the class notes); do not modify the result in place."""
        with torch.no_grad():
            x0, slot = self.denoise_chunk(noise, renoise)
        self._deferred = (x0, slot)
        return x0

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, latents: torch.Tensor, on_chunk: Callable[[int, int], None] | None = None) -> None:
        """Continue the stream from known clean latents instead of generated ones: an encoded start
        image (1 latent frame) or video (1 + 4k frames give 1 + k latents).

        ``latents``: model space, frame-major ``[B or 1, T, 16, h, w]`` (a batch of 1 serves every
        sample). They are cut into chunks of ``chunk_frames`` from the session's current frame; each
        chunk gets what a generated chunk gets after its denoising: the context pass at
        ``context_timestep`` that writes its clean keys/values (with the eviction and sink update
        before it), ``recent`` for re-caching, and the noise generators advance by the draws
        generating it would have made. So after whole chunks the session (cache, sink, counters,
        generators) is exactly that of a stream that generated these latents with its own noise,
        and ``next_chunk`` continues as that stream would. A remainder of T mod ``chunk_frames``
        frames becomes one shorter chunk (its frames see each other and everything before); the
        stream goes on in whole chunks after it, so a start image is a 1-frame chunk.

        ``on_chunk(frames prefilled, T)`` is called after every chunk. ``interrupt`` is honoured
        before every pass; a cancelled prefill keeps the chunks it finished (``frames_done``).
        """
        n, total = self.config.chunk_frames, self._check_prefill(latents)
        x = latents.to(self.device, self.dtype).expand(self.batch, -1, -1, -1, -1)
        self.flush()
        if self._chunk_rng is not None:  # a cancelled chunk drew part of its noise: rewind it
            for g, s in zip(self.generators, self._chunk_rng):
                g.set_state(s)
        for start in range(0, total, n):
            chunk = x[:, start : start + n].contiguous()
            self._prefill_chunk(chunk)
            if on_chunk is not None:
                on_chunk(start + chunk.shape[1], total)

    def _check_prefill(self, latents: torch.Tensor) -> int:
        """Validate prefill latents before anything changes; returns their frame count."""
        c = self.model.cfg.in_dim
        want = f"[{self.batch} or 1, frames >= 1, {c}, {self.latent_hw[0]}, {self.latent_hw[1]}]"
        if (
            latents.ndim != 5
            or latents.shape[0] not in (1, self.batch)
            or latents.shape[1] < 1
            or tuple(latents.shape[2:]) != (c, *self.latent_hw)
        ):
            raise ValueError(f"prefill latents must be {want} (model space), got {list(latents.shape)}")
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise ValueError("prefill latents must be finite floating-point values")
        total = latents.shape[1]
        first = min(total, self.config.chunk_frames)
        if self.cache.pending is not None and self.cache.pending != first:
            raise ValueError(
                f"a cancelled chunk of {self.cache.pending} frames is pending; prefill cannot begin with "
                f"a chunk of {first} frames (reset() the session, or prefill at least {self.cache.pending})"
            )
        held = self.cache.frames + (0 if self._deferred is None else self._deferred[0].shape[1])
        if self.config.sink_policy == "global" and held + total > self.cache.capacity:
            raise CacheFullError(
                f"prefill of {total} latent frames after {held} exceeds the 'global' sink policy's "
                f"max_frames={self.cache.capacity}; raise max_frames or use 'ema', 'static' or 'none'"
            )
        return total

    def _prefill_chunk(self, x: torch.Tensor) -> None:
        """One known chunk: eviction (and a due re-cache), context pass and commit (``finish_chunk``),
        then the noise draws of ``denoise_chunk`` (one per denoising step, same shape), drawn and
        dropped so that the generators end where generating the chunk leaves them."""
        n = x.shape[1]
        self.finish_chunk(x, self._begin_chunk(n))
        for _ in self.timesteps:
            self._noise(n)
