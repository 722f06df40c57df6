"""``reward-forcing download``: fetch the official weights into a models folder."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from rf_core.commands.errors import CliError, one_line
from rf_core.commands.paths import output_folder
from rf_core.io.hub import DEFAULT_ITEMS, ITEMS, download

EPILOG = """\
examples:
  reward-forcing download --dir models                       # rewardforcing.pt, Wan2.1 VAE, umT5-XXL + tokenizer
  reward-forcing download --dir models --what taehv          # the TAEHV preview decoder only
  reward-forcing download --dir ComfyUI/models/reward_forcing --what rewardforcing vae

Needs huggingface_hub (pip install -e ".[hub]") and network access; files already there are kept."""


def register(subparsers) -> None:
    items = "\n".join(
        f"  {name:14s} {it.description}" + (f" [{it.note}]" if it.note else "") for name, it in ITEMS.items()
    )
    p = subparsers.add_parser(
        "download",
        help="download the official model files (needs huggingface_hub)",
        description=f"Download model files with progress.\n\nitems:\n{items}",
        epilog=EPILOG,
    )
    p.add_argument(
        "--what",
        nargs="+",
        choices=sorted(ITEMS),
        default=list(DEFAULT_ITEMS),
        metavar="ITEM",
        help=f"what to fetch, see the list above (default: {' '.join(DEFAULT_ITEMS)})",
    )
    p.add_argument(
        "--dir", required=True, help="models folder, made if missing (e.g. ComfyUI/models/reward_forcing)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output_folder(args.dir, "--dir", inputs=[])
    from_hub = [name for name in args.what if ITEMS[name].repo_id is not None]
    if from_hub and importlib.util.find_spec("huggingface_hub") is None:
        raise CliError(
            f"--what {' '.join(from_hub)}: downloading from Hugging Face needs huggingface_hub, which is not "
            "installed: pip install -e '.[hub]' (or pip install huggingface_hub)"
        )
    for name in dict.fromkeys(args.what):
        item = ITEMS[name]
        src = item.repo_id or item.url
        print(
            f"{name}: {', '.join(item.files)} from {src}" + (f" ({item.note})" if item.note else ""),
            file=sys.stderr,
        )
        try:
            dest = download(name, args.dir)
        except Exception as e:  # network, hub and disk errors alike: say which item failed
            raise CliError(f"--what {name}: download from {src} failed: {one_line(e)}") from e
        print(f"{name}: done -> {dest}", file=sys.stderr)
    return 0
