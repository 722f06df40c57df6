"""Streaming generation in a graph: EMA-Sink settings, Stream Generate, Stream Session (kept across
queue runs), and decoding of LATENTs with our decoders or ComfyUI's VAE."""
