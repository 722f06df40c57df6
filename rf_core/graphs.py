"""CUDA graphs for the model passes of a stream that repeat with the same shapes and buffers.

From the third chunk on, every chunk runs the same passes (the denoising steps and the cache refresh)
over the same cache slot, so each pass is captured once and replayed: the CPU no longer launches and
dispatches some 1500 kernels per chunk. A pass is captured the second time its key is seen, so the
first run has compiled its kernels and built its cuDNN plans and RoPE tables outside the capture.

Everything a captured pass reads lives at a fixed address: its input latent (copied into a static
buffer), the KV cache, the cross-attention keys/values (updated in place on a prompt switch, see
``StreamSession._cross_kv``), the plan's RoPE tables (kept alive with the graph) and the weights.
Weights can move (a LoRA patched in, ComfyUI offloading the model), so every pass compares their
addresses with those at capture (about 0.1 ms) and drops all graphs when they differ. All graphs share
one memory pool and keep only their small output alive, so no replay overwrites live data; a caller
must use a graph's output before it replays that graph again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class PassGraphs:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()
        self.seen: set[Hashable] = set()
        self.graphs: dict[Hashable, tuple] = {}
        self.weights: tuple[int, ...] = ()

    def _check_weights(self) -> None:
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        if weights != self.weights:
            self.graphs.clear()
            self.seen.clear()
            self.weights = weights

    def run(
        self,
        key: Hashable,
        fn: Callable[[torch.Tensor], torch.Tensor | None],
        x: torch.Tensor,
        keep: object,
    ) -> torch.Tensor | None:
        """``fn(x)``, replayed from a graph once ``key`` has been seen before. ``keep``: objects
        holding tensors the pass reads that must outlive the graph."""
        self._check_weights()
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen.add(key)
                return fn(x)
            static_x = x.clone()
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads' CUDA calls (ComfyUI's server, a decoder) may go on meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_out = fn(static_x)
            entry = self.graphs[key] = (graph, static_x, static_out, keep)
        graph, static_x, static_out, _ = entry
        static_x.copy_(x)
        graph.replay()
        return static_out
