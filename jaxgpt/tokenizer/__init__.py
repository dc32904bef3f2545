"""Tokenizers: GPT-2's, or a byte-level BPE trained for a corpus (``python -m jaxgpt.tokenizer train``)."""

from jaxgpt.tokenizer.encoding import (
    EOT,
    EOT_ID,
    GPT2,
    MAX_VOCAB_SIZE,
    VOCAB_SIZE,
    Tokenizer,
    TokenizerUnavailableError,
    check_same_tokenizer,
    has_tokenizer,
    load_tokenizer,
    tokenizer_of,
)

__all__ = [
    "EOT",
    "EOT_ID",
    "GPT2",
    "MAX_VOCAB_SIZE",
    "VOCAB_SIZE",
    "Tokenizer",
    "TokenizerUnavailableError",
    "check_same_tokenizer",
    "has_tokenizer",
    "load_tokenizer",
    "tokenizer_of",
]
