"""umT5 tokenizer (``google/umt5-xxl``'s ``tokenizer.json``) read with the ``tokenizers`` package.

Reproduces what Wan's ``HuggingfaceTokenizer(clean="whitespace")`` feeds the encoder: cleaned
text, the EOS token appended, truncated and padded to 512 tokens, plus the attention mask.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

import torch

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy.fix_text (when installed), HTML-unescape twice, collapse whitespace."""
    try:
        import ftfy
    except ImportError:  # optional: it only repairs mojibake, which typed prompts rarely have
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """Prompts -> (ids, mask), each ``[B, max_length]`` int64.

    Each row is the prompt's tokens, cut to ``max_length - 1``, then EOS, then ``pad_id`` up to
    ``max_length``; the mask is 1 on the tokens and EOS. EOS and pad ids are read from the
    tokenizer's ``</s>`` and ``<pad>`` tokens (1 and 0 for umT5) unless given.
    """

    def __init__(
        self,
        path: str | Path,
        max_length: int = 512,
        eos_id: int | None = None,
        pad_id: int | None = None,
        clean: bool = True,
    ) -> None:
        from tokenizers import Tokenizer

        file = _tokenizer_file(Path(path))
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises plain Exceptions with a parse message
            raise ValueError(f"{file}: cannot read tokenizer: {err}") from err
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for EOS), got {max_length}")
        self.max_length = max_length
        self.eos_id = eos_id if eos_id is not None else self._special_id(file, "</s>")
        self.pad_id = pad_id if pad_id is not None else self._special_id(file, "<pad>")
        self.clean = clean

    def _special_id(self, file: Path, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{file}: tokenizer has no {token!r} token; pass its id explicitly")
        return token_id

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_prompt(p) if self.clean else p for p in prompts]
        # Special tokens are added here rather than by the file's post-processor, so a tokenizer.json
        # without one still yields the EOS the encoder was trained with.
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, enc in enumerate(encodings):
            tokens = enc.ids[: self.max_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


def _tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise FileNotFoundError(
                f"{path}: no tokenizer.json in this directory (found {found}); the google/umt5-xxl "
                "tokenizer.json is required (a bare spiece.model is not supported)"
            )
        return file
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path
