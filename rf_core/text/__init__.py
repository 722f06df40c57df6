"""umT5-XXL text encoding: tokenizer, encoder, checkpoint loading and prompt-embedding files."""

from rf_core.text.embeddings import (
    NEGATIVE_PROMPT_NAME,
    WAN_NEGATIVE_PROMPT,
    PromptEmbedding,
    PromptEmbeddingError,
    PromptEmbeddingFile,
    encode_prompt_embeddings,
    load_prompt_embeddings,
    save_prompt_embeddings,
)
from rf_core.text.text_encoder import TextEncoder
from rf_core.text.tokenizer import UMT5Tokenizer, clean_prompt
from rf_core.text.umt5 import UMT5_TINY, UMT5_XXL, UMT5Config, UMT5Encoder
from rf_core.text.umt5_checkpoint import load_umt5

__all__ = [
    "NEGATIVE_PROMPT_NAME",
    "UMT5_TINY",
    "UMT5_XXL",
    "WAN_NEGATIVE_PROMPT",
    "PromptEmbedding",
    "PromptEmbeddingError",
    "PromptEmbeddingFile",
    "TextEncoder",
    "UMT5Config",
    "UMT5Encoder",
    "UMT5Tokenizer",
    "clean_prompt",
    "encode_prompt_embeddings",
    "load_prompt_embeddings",
    "load_umt5",
    "save_prompt_embeddings",
]
