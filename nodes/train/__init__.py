"""Re-DMD LoRA training from a graph."""
