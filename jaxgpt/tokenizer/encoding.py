"""Byte-pair encodings through tiktoken: GPT-2's, or one trained for a corpus and saved in a folder.

GPT-2's is tiktoken's ``r50k_base``: the same 50,256 merges, the same split pattern and
``<|endoftext|>`` = 50256. It reads its rank file from ``TIKTOKEN_CACHE_DIR`` (or downloads it
once when online), so offline machines point that variable at a directory holding the file.
Unset, it defaults to the shared data folder beside the checkout (``../shared/data/tiktoken``)
when that exists.

A trained tokenizer (``python -m jaxgpt.tokenizer train``) is two files in a folder: its
mergeable ranks in tiktoken's format (``tokenizer.tiktoken``: base64 bytes and rank per line)
and ``tokenizer.spec.json`` (name, split pattern, special tokens, fingerprint). Data folders, run
folders and exported models carry a copy, so each says which tokenizer its ids belong to:
:func:`tokenizer_of` reads it, and a folder without one is GPT-2's.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.core.errors import UserError

GPT2 = "gpt2"  # the name users give for GPT-2's tokenizer (--tokenizer gpt2)
ENCODING_NAME = "r50k_base"
EOT = "<|endoftext|>"
EOT_ID = 50256  # GPT-2's; other tokenizers have their own (Tokenizer.eot_id)
VOCAB_SIZE = 50257
MAX_VOCAB_SIZE = 1 << 16  # token shards are uint16
RANKS_FILE = "tokenizer.tiktoken"
SPEC_FILE = "tokenizer.spec.json"
SHARED_CACHE = Path("shared") / "data" / "tiktoken"  # beside the checkout, next to tiny Shakespeare


class TokenizerUnavailableError(UserError):
    """The BPE ranks could not be loaded (offline and no cache)."""


class Tokenizer:
    """A picklable wrapper over a tiktoken encoding; ``source`` is ``"gpt2"`` or a folder holding a tokenizer.

    ``encoding`` is given only for a tokenizer just trained, not yet saved to a folder.
    """

    def __init__(self, source: str | os.PathLike = GPT2, encoding: Any = None) -> None:
        self.source = str(source)
        if encoding is None:
            encoding = _load_encoding() if self.source == GPT2 else _load_folder(Path(self.source))
        self._enc = encoding
        self.name: str = self._enc.name
        self.eot_id: int = self._enc.eot_token
        self.vocab_size: int = self._enc.n_vocab
        if self.source == GPT2:
            assert (self.eot_id, self.vocab_size) == (EOT_ID, VOCAB_SIZE), (self.eot_id, self.vocab_size)

    @property
    def is_gpt2(self) -> bool:
        return self.source == GPT2

    @property
    def pattern(self) -> str:
        return self._enc._pat_str

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return self._enc._mergeable_ranks

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._enc._special_tokens)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the ranks (in tiktoken's file format), the split pattern and the special tokens."""
        digest = hashlib.sha256(ranks_text(self.mergeable_ranks).encode())
        digest.update(json.dumps([self.pattern, sorted(self.special_tokens.items())]).encode())
        return digest.hexdigest()

    def describe(self) -> str:
        return "GPT-2's" if self.is_gpt2 else f"{self.name} ({self.vocab_size:,} tokens, from {self.source})"

    def encode(self, text: str, *, allow_eot: bool = False) -> list[int]:
        """Encodes text; ``<|endoftext|>`` in the text is a special token only if allowed."""
        if allow_eot:
            return self._enc.encode(text, allowed_special={EOT})
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Each text's tokens, encoded in threads; <|endoftext|> in a text is ordinary text here."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
        """The text of ``tokens``; an id outside GPT-2's vocabulary (a padded one, say) is a ValueError."""
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the tokenizer's vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return self._enc.decode(ids)

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        """Raw bytes: a single token can end inside a UTF-8 character (useful when streaming)."""
        return self._enc.decode_bytes([int(t) for t in tokens])

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the two files :func:`tokenizer_of` reads (into an existing folder)."""
        directory = Path(directory)
        (directory / RANKS_FILE).write_text(ranks_text(self.mergeable_ranks))
        spec = {"name": self.name, "pattern": self.pattern, "special_tokens": self.special_tokens}
        spec["fingerprint"] = self.fingerprint
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")

    def __reduce__(self):  # worker processes rebuild the encoder instead of pickling it
        return (load_tokenizer, (self.source,))


def ranks_text(ranks: dict[bytes, int]) -> str:
    """tiktoken's rank-file format: ``base64(token) rank`` per line, by rank."""
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def make_encoding(name: str, pattern: str, ranks: dict[bytes, int], special_tokens: dict[str, int]) -> Any:
    """A tiktoken encoding; the vocabulary must fit uint16 shards and hold ``<|endoftext|>``."""
    import tiktoken

    vocab = len(ranks) + len(special_tokens)
    if vocab > MAX_VOCAB_SIZE:
        raise UserError(f"a vocabulary of {vocab:,} tokens does not fit uint16 token shards (at most {MAX_VOCAB_SIZE})")
    if EOT not in special_tokens:
        raise UserError(f"tokenizer {name} has no {EOT} token")
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)


def _load_folder(directory: Path) -> Any:
    spec_path, ranks_path = directory / SPEC_FILE, directory / RANKS_FILE
    if not spec_path.is_file() or not ranks_path.is_file():
        raise UserError(
            f"{directory} holds no tokenizer ({SPEC_FILE} and {RANKS_FILE}); train one with "
            f"python -m jaxgpt.tokenizer train, or use --tokenizer {GPT2}"
        )
    try:
        spec = json.loads(spec_path.read_text())
        ranks = {}
        for line in ranks_path.read_text().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        encoding = make_encoding(spec["name"], spec["pattern"], ranks, spec["special_tokens"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"the tokenizer in {directory} is damaged ({err!r}); train or copy it again") from None
    return encoding


def _default_cache_dir() -> None:
    """Points tiktoken at ``../shared/data/tiktoken`` (from the working or the repository directory) if unset."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    for base in (Path.cwd().parent, Path(__file__).resolve().parents[3]):
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
def load_tokenizer(source: str = GPT2) -> Tokenizer:
    """``"gpt2"`` or a folder holding a tokenizer (loaded once per process)."""
    return Tokenizer(source)


def has_tokenizer(directory: str | os.PathLike) -> bool:
    return (Path(directory) / SPEC_FILE).is_file()


def tokenizer_of(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a data, run or model folder carries; GPT-2's for one without (or a hub id)."""
    return load_tokenizer(str(path)) if has_tokenizer(path) else load_tokenizer(GPT2)


def check_same_tokenizer(expected: Tokenizer, found: Tokenizer, expected_what: str, found_what: str) -> None:
    """Token ids of two tokenizers mean different text: using one's ids with the other is an error."""
    if expected.fingerprint != found.fingerprint:
        raise UserError(
            f"{found_what} uses the tokenizer {found.describe()} but {expected_what} uses {expected.describe()}; "
            "prepare the data again with the model's tokenizer (python -m jaxgpt.data.prepare --tokenizer DIR|gpt2)"
        )
