"""``reward-forcing download``: fetch the official weights into a models folder."""

from __future__ import annotations

import argparse
import sys

from rf_core.io.hub import DEFAULT_ITEMS, ITEMS, download


def register(subparsers) -> None:
    items = "\n".join(
        f"  {name:14s} {it.description}" + (f" [{it.note}]" if it.note else "") for name, it in ITEMS.items()
    )
    p = subparsers.add_parser(
        "download",
        help="download the official model files (needs huggingface_hub)",
        description=f"Download model files with progress.\n\nitems:\n{items}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--what",
        nargs="+",
        choices=sorted(ITEMS),
        default=list(DEFAULT_ITEMS),
        metavar="ITEM",
        help=f"what to fetch (default: {' '.join(DEFAULT_ITEMS)}); see the list above",
    )
    p.add_argument("--dir", required=True, help="models folder (e.g. ComfyUI/models/reward_forcing)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in dict.fromkeys(args.what):
        item = ITEMS[name]
        src = item.repo_id or item.url
        print(
            f"{name}: {', '.join(item.files)} from {src}" + (f" ({item.note})" if item.note else ""),
            file=sys.stderr,
        )
        dest = download(name, args.dir)
        print(f"{name}: done -> {dest}", file=sys.stderr)
    return 0
