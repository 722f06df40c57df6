"""Where the official weights live, and fetching them (huggingface_hub is optional and imported only
when something is downloaded). Repo ids and file names: reference-algorithm.md §6, §7.4, §11."""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rf_core.io.partial import partial_path


@dataclass(frozen=True)
class HubItem:
    description: str
    folder: str  # under the models folder; "." for the folder itself
    files: tuple[str, ...]  # file names or glob patterns inside the repository
    repo_id: str | None = None  # Hugging Face model repository
    url: str | None = None  # direct download when the file is not on Hugging Face
    note: str = ""


ITEMS: dict[str, HubItem] = {
    "rewardforcing": HubItem(
        "Reward Forcing 4-step causal student (1.3B)",
        "Reward-Forcing-T2V-1.3B",
        ("rewardforcing.pt",),
        repo_id="JaydenLu666/Reward-Forcing-T2V-1.3B",
    ),
    "wan-1.3b": HubItem(
        "Wan2.1-T2V-1.3B base DiT and its config (critic / initialisation)",
        "Wan2.1-T2V-1.3B",
        ("config.json", "diffusion_pytorch_model.safetensors"),
        repo_id="Wan-AI/Wan2.1-T2V-1.3B",
    ),
    "vae": HubItem("Wan2.1 VAE", "Wan2.1-T2V-1.3B", ("Wan2.1_VAE.pth",), repo_id="Wan-AI/Wan2.1-T2V-1.3B"),
    "t5": HubItem(
        "umT5-XXL text encoder (bf16) and its tokenizer",
        "Wan2.1-T2V-1.3B",
        ("models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*"),
        repo_id="Wan-AI/Wan2.1-T2V-1.3B",
    ),
    "wan-14b": HubItem(
        "Wan2.1-T2V-14B teacher DiT (sharded, about 57 GB) and its config",
        "Wan2.1-T2V-14B",
        (
            "config.json",
            "diffusion_pytorch_model*.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
        ),
        repo_id="Wan-AI/Wan2.1-T2V-14B",
    ),
    "ode-init": HubItem(
        "Self-Forcing ODE initialisation of the causal student (training start point)",
        ".",
        ("checkpoints/ode_init.pt",),
        repo_id="gdhe17/Self-Forcing",
    ),
    "self-forcing": HubItem(
        "Self-Forcing DMD student", ".", ("checkpoints/self_forcing_dmd.pt",), repo_id="gdhe17/Self-Forcing"
    ),
    "longlive": HubItem(
        "LongLive-1.3B base student and its LoRA",
        "LongLive-1.3B",
        ("models/longlive_base.pt", "models/lora.pt"),
        repo_id="Efficient-Large-Model/LongLive-1.3B",
        note="weights licensed CC-BY-NC-4.0 (non-commercial)",
    ),
    "taehv": HubItem(
        "TAEHV tiny Wan2.1 decoder (fast previews)",
        ".",
        ("taew2_1.pth",),
        url="https://github.com/madebyollin/taehv/raw/main/taew2_1.pth",
    ),
}
DEFAULT_ITEMS = ("rewardforcing", "vae", "t5")


def download(name: str, models_dir: str | Path) -> Path:
    """Fetch one item into ``models_dir/<item folder>`` (with progress bars); returns that folder."""
    item = ITEMS[name]
    dest = Path(models_dir) / item.folder
    dest.mkdir(parents=True, exist_ok=True)
    if item.repo_id is not None:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise RuntimeError(
                "downloading needs huggingface_hub: pip install 'reward-forcing-stream[hub]' (or huggingface_hub)"
            ) from e
        snapshot_download(repo_id=item.repo_id, allow_patterns=list(item.files), local_dir=str(dest))
    elif not (dest / item.files[0]).is_file():  # a finished download is kept (partials have other names)
        _fetch_url(item.url, dest / item.files[0])
    return dest


def _fetch_url(url: str, target: Path) -> None:
    from tqdm import tqdm

    tmp = partial_path(target)
    try:
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
