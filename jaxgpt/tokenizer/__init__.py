"""Text <-> token ids: GPT-2's BPE through tiktoken."""

from jaxgpt.tokenizer.encoding import EOT_ID, VOCAB_SIZE, Tokenizer, TokenizerUnavailableError, get_tokenizer

__all__ = ["EOT_ID", "VOCAB_SIZE", "Tokenizer", "TokenizerUnavailableError", "get_tokenizer"]
