"""Shared fixtures. Tests run on CPU in fp32 with tiny random models."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_pack():
    """Import the repository root as the ComfyUI pack package ``rf_pack`` (its folder name varies)."""
    if "rf_pack" in sys.modules:
        return sys.modules["rf_pack"]
    spec = importlib.util.spec_from_file_location(
        "rf_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rf_pack"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
