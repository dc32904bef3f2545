"""Training a byte-level BPE for a corpus with rustbpe (as nanochat does), saved for tiktoken.

rustbpe learns the merges on the train split's text, cut by GPT-2's or GPT-4's split pattern; the
merges become tiktoken's mergeable ranks (the 256 bytes first, then one token per merge) and
``<|endoftext|>`` takes the id after the last merge. The compression report (like nanochat's
``tok_eval``) is the UTF-8 bytes per token on the train and val splits, beside GPT-2's when its ranks
are at hand: more bytes per token means shorter sequences for the same text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, Protocol

from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.tokenizer.encoding import (
    EOT,
    MAX_VOCAB_SIZE,
    Tokenizer,
    TokenizerUnavailableError,
    load_tokenizer,
    make_encoding,
)

PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",  # r50k_base
    "gpt4": (  # cl100k_base
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
        r"""|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
}
MIN_VOCAB_SIZE = 256 + 1  # every byte, and <|endoftext|>
SPLITS = ("train", "val")


class Piece(Protocol):  # jaxgpt.data.sources.Piece: a span of the corpus and its split
    text: str
    split: str


@dataclasses.dataclass(frozen=True)
class BPEConfig:
    """The tokenizer to train: vocabulary size and split pattern."""

    vocab_size: int = option(4096, f"tokens in the vocabulary, <|endoftext|> included ({MIN_VOCAB_SIZE} to 65536)")
    pattern: Literal["gpt2", "gpt4"] = option("gpt4", "the regex that cuts text into words before merging")

    def __post_init__(self) -> None:
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise UserError(
                f"--vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (token shards are uint16), "
                f"got {self.vocab_size}"
            )


def train_bpe(texts: Iterable[str], config: BPEConfig, name: str) -> Tokenizer:
    """A tokenizer of ``config.vocab_size`` tokens learnt on ``texts`` (not yet saved: see :func:`save_trained`)."""
    import rustbpe

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), config.vocab_size - 1, pattern=PATTERNS[config.pattern])
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    assert sorted(ranks.values()) == list(range(len(ranks))), "ranks are 0..n-1"
    if len(ranks) < config.vocab_size - 1:
        raise UserError(
            f"the text holds only enough repeats for {len(ranks) + 1:,} tokens, not --vocab_size "
            f"{config.vocab_size:,}; give more text or a smaller vocabulary"
        )
    return Tokenizer("<unsaved>", make_encoding(name, PATTERNS[config.pattern], ranks, {EOT: len(ranks)}))


def save_trained(tokenizer: Tokenizer, out: str | Path) -> Tokenizer:
    """Saves ``tokenizer`` into ``out`` (created) and returns it loaded back from there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    load_tokenizer.cache_clear()  # a folder trained again must not be served from the cache
    saved = load_tokenizer(str(out))
    assert saved.fingerprint == tokenizer.fingerprint
    return saved


def compression(tokenizer: Tokenizer, pieces: Iterable[Piece]) -> dict[str, dict[str, int | float]]:
    """UTF-8 bytes, tokens and bytes per token of each split."""
    counts = {split: {"bytes": 0, "tokens": 0} for split in SPLITS}
    for piece in pieces:
        counts[piece.split]["bytes"] += len(piece.text.encode("utf-8"))
        counts[piece.split]["tokens"] += len(tokenizer.encode(piece.text))
    for split in counts.values():
        split["bytes_per_token"] = split["bytes"] / max(split["tokens"], 1)
    return counts


def train_on_corpus(pieces: Callable[[], Iterator[Piece]], config: BPEConfig, out: str | Path, name: str) -> Tokenizer:
    """Trains on the train split of ``pieces()`` (called once per pass), saves to ``out``, prints the report."""
    trained = train_bpe((p.text for p in pieces() if p.split == "train"), config, name)
    tokenizer = save_trained(trained, out)
    print(f"trained tokenizer {tokenizer.name}: {tokenizer.vocab_size:,} tokens, {config.pattern}'s split pattern")
    print(format_report({tokenizer.name: compression(tokenizer, pieces()), **_gpt2_report(pieces)}))
    return tokenizer


def _gpt2_report(pieces: Callable[[], Iterator[Piece]]) -> dict[str, dict]:
    try:
        return {"gpt2 (50,257)": compression(load_tokenizer(), pieces())}
    except TokenizerUnavailableError:
        return {}


def format_report(reports: dict[str, dict[str, dict[str, int | float]]]) -> str:
    """One row per tokenizer: bytes per token on each split."""
    width = max(len("tokenizer"), *map(len, reports))
    lines = [f"{'tokenizer':<{width}}  {'train bytes/token':>17}  {'val bytes/token':>15}"]
    for name, report in reports.items():
        train, val = (report[s]["bytes_per_token"] for s in SPLITS)
        lines.append(f"{name:<{width}}  {train:>17.3f}  {val:>15.3f}")
    return "\n".join(lines)
