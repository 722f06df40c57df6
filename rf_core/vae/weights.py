"""Decoder checkpoint reading, kept under this name because ``nodes/loaders.py`` imports it from here.

The implementation is the one every loader shares: ``rf_core.io.safe_load``.
"""

from rf_core.io.safe_load import CheckpointError, read_state_dict

__all__ = ["CheckpointError", "read_state_dict"]
