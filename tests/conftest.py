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


# ----------------------------------------------------------------------------- node pack fixtures
@pytest.fixture(scope="session")
def rf_pack():
    """The node pack imported as ComfyUI would (package ``rf_pack``), without ComfyUI."""
    return load_pack()


@pytest.fixture(scope="session")
def rf_model_dir(tmp_path_factory, rf_pack):
    """A ComfyUI-like models/ folder with tiny synthetic files in the real formats, under the names the
    example workflows use, registered as the pack's model folders (its fallback outside ComfyUI)."""
    from safetensors.torch import save_file

    from rf_core.tiny import random_model
    from rf_core.vae.taehv import TAEHV, TAEHVConfig
    from rf_core.vae.wan_vae import WanVAE, WanVAEConfig

    root = tmp_path_factory.mktemp("models")
    g = torch.Generator().manual_seed(7)
    folders = {}
    for name in (
        "diffusion_models",
        "reward_forcing",
        "vae",
        "vae_approx",
        "loras",
        "reward_forcing_prompts",
    ):
        folders[name] = root / name
        folders[name].mkdir()
    # Reward Forcing's released layout: one flat dict of "model."-prefixed generator weights.
    dit = random_model("tiny", seed=0)
    torch.save(
        {f"model.{k}": v for k, v in dit.state_dict().items()},
        folders["diffusion_models"] / "rewardforcing.pt",
    )
    vae = WanVAE(WanVAEConfig(dim=8))
    with torch.no_grad():
        for name, p in vae.named_parameters():  # random gains/biases too: all-ones gains hide mistakes
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()}, folders["vae"] / "wan_2.1_vae.safetensors"
    )
    torch.save(TAEHV(TAEHVConfig(widths=(8, 8, 8, 8))).state_dict(), folders["vae_approx"] / "taew2_1.pth")
    for name, path in folders.items():
        rf_pack.nodes.comfy.set_fallback_folders(name, [path])
    return root


# ----------------------------------------------------------------------------- shared test setup
@pytest.fixture
def one_thread():
    """Torch on one thread for the test: with tiny models thread start-up costs more than it saves,
    and CI has two cores. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rf_output_dir(tmp_path, monkeypatch):
    """The pack's output folder (RF_OUTPUT_DIR), moved to tmp_path/output for the test."""
    out = tmp_path / "output"
    monkeypatch.setenv("RF_OUTPUT_DIR", str(out))
    return out
