"""Loading files: the causal DiT, LoRAs on it, and the streaming decoders."""
