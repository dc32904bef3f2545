"""``python -m jaxgpt.tokenizer train --input FILE_OR_DIR --vocab_size N --out DIR [--pattern gpt2|gpt4]``."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxgpt.core.cli import build, parser_for, run
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.data import sources
from jaxgpt.tokenizer.train import BPEConfig, train_on_corpus

PROG = "python -m jaxgpt.tokenizer"


@dataclasses.dataclass(frozen=True)
class TokenizerTrainConfig:
    """Train a byte-level BPE tokenizer on a corpus and save it where tiktoken (and jaxgpt) load it."""

    input: str | None = option(None, "a UTF-8 text file, or a folder of .txt / .jsonl files (jsonl: a 'text' field)")
    out: str | None = option(None, "folder to write tokenizer.tiktoken and tokenizer.spec.json into")
    name: str | None = option(None, "the tokenizer's name (default: the folder's name)")
    val_fraction: float = option(0.1, "held out for the report as prepare holds it out (the same split)")

    def __post_init__(self) -> None:
        if self.input is None or self.out is None:
            raise UserError("give --input FILE_OR_DIR and --out DIR")
        if not Path(self.input).exists():
            raise UserError(f"--input {self.input} does not exist")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "train":
        raise UserError(f"usage: {PROG} train --input FILE_OR_DIR --vocab_size N --out DIR (see {PROG} train --help)")
    parser = parser_for(f"{PROG} train", TokenizerTrainConfig.__doc__, (TokenizerTrainConfig, None), (BPEConfig, None))
    namespace = parser.parse_args(args[1:])
    config, bpe = build(TokenizerTrainConfig, namespace), build(BPEConfig, namespace)
    pieces = lambda: sources.path_pieces(Path(config.input), config.val_fraction)[0]
    train_on_corpus(pieces, bpe, config.out, config.name or Path(config.out).resolve().name)
    print(f"saved in {config.out} (prepare data with it: python -m jaxgpt.data.prepare --tokenizer {config.out})")


if __name__ == "__main__":
    run(main)
