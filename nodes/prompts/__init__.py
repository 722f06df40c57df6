"""Prompt embeddings saved to and loaded from files, so sessions run without the text encoder."""
