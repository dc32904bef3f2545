"""GPT-2 byte-pair encoding through tiktoken.

tiktoken's ``r50k_base`` encoding is GPT-2's: the same 50,256 merges, the same
split pattern and ``<|endoftext|>`` = 50256. It reads its rank file from
``TIKTOKEN_CACHE_DIR`` (or downloads it once when online), so offline machines
point that variable at a directory holding the file. Unset, it defaults to the
shared data folder beside the checkout (``../shared/data/tiktoken``) when that exists.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxgpt.core.errors import UserError

ENCODING_NAME = "r50k_base"
EOT_ID = 50256
VOCAB_SIZE = 50257
SHARED_CACHE = Path("shared") / "data" / "tiktoken"  # beside the checkout, next to tiny Shakespeare


class TokenizerUnavailableError(UserError):
    """The BPE ranks could not be loaded (offline and no cache)."""


class Tokenizer:
    """A thin, picklable wrapper over tiktoken's GPT-2 encoding."""

    name = ENCODING_NAME
    eot_id = EOT_ID
    vocab_size = VOCAB_SIZE

    def __init__(self) -> None:
        self._enc = _load_encoding()
        assert self._enc.eot_token == EOT_ID, self._enc.eot_token
        assert self._enc.n_vocab == VOCAB_SIZE, self._enc.n_vocab

    def encode(self, text: str, *, allow_eot: bool = False) -> list[int]:
        """Encodes text; ``<|endoftext|>`` in the text is a special token only if allowed."""
        if allow_eot:
            return self._enc.encode(text, allowed_special={"<|endoftext|>"})
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Each text's tokens, encoded in threads; <|endoftext|> in a text is ordinary text here."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
        """The text of ``tokens``; an id outside GPT-2's vocabulary (a padded one, say) is a ValueError."""
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids outside GPT-2's vocabulary [0, {VOCAB_SIZE}): {bad[:5]}")
        return self._enc.decode(ids)

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        """Raw bytes: a single token can end inside a UTF-8 character (useful when streaming)."""
        return self._enc.decode_bytes([int(t) for t in tokens])

    def __reduce__(self):  # worker processes rebuild the encoder instead of pickling it
        return (Tokenizer, ())


def _default_cache_dir() -> None:
    """Points tiktoken at ``../shared/data/tiktoken`` (from the working or the repository directory) if unset."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    for base in (Path.cwd().parent, Path(__file__).resolve().parents[2]):
        if (base / SHARED_CACHE).is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(base / SHARED_CACHE)
            return


@functools.cache
def _load_encoding():
    import tiktoken

    _default_cache_dir()
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as err:  # tiktoken raises requests/ValueError/OSError variants offline
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise TokenizerUnavailableError(
            f"could not load GPT-2's BPE ranks ({ENCODING_NAME}): {err}. "
            f"Offline? Set TIKTOKEN_CACHE_DIR to a directory holding the rank file "
            f"(e.g. TIKTOKEN_CACHE_DIR=../shared/data/tiktoken); it is now {cache}."
        ) from err


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process's one GPT-2 tokenizer, built once: loading the BPE ranks is slow."""
    return Tokenizer()
