"""Which tokenizer a training run uses: the data's, checked against the model's, and copied into the run.

The data folder says which tokenizer its ids belong to (``prepare`` saves a trained tokenizer beside
the shards and records its fingerprint in ``meta.json``; a folder without one is GPT-2's). A resumed
run or pretrained weights carry theirs too: ids of one tokenizer read with another are nonsense, so a
mismatch stops the run before anything is compiled. The run folder gets a copy, so sampling,
evaluation, chat and conversion read the run's tokenizer without being told.
"""

from __future__ import annotations

import os

from jaxgpt.core.errors import UserError
from jaxgpt.data.meta import read_meta
from jaxgpt.model.config import GPTConfig
from jaxgpt.tokenizer import Tokenizer, check_same_tokenizer, tokenizer_of


def data_tokenizer(data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared data folder, checked against the fingerprint its meta.json records."""
    tokenizer = tokenizer_of(data_dir)
    recorded = read_meta(data_dir).get("tokenizer_fingerprint")
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise UserError(
            f"{data_dir} was tokenized with a tokenizer of fingerprint {recorded[:12]}, but it holds "
            f"{tokenizer.describe()} ({tokenizer.fingerprint[:12]}); prepare the data again"
        )
    return tokenizer


def run_tokenizer(data_dir: str, model_from: str | None) -> Tokenizer:
    """The data's tokenizer; ``model_from`` (the run resumed, or the weights fine-tuned) must use the same."""
    tokenizer = data_tokenizer(data_dir)
    if model_from is not None:
        check_same_tokenizer(tokenizer_of(model_from), tokenizer, f"the model in {model_from}", f"the data {data_dir}")
    return tokenizer


def with_vocab(config: GPTConfig, tokenizer: Tokenizer, vocab_given: bool) -> GPTConfig:
    """A new model's vocabulary is its tokenizer's, unless ``--vocab_size`` says otherwise."""
    if tokenizer.is_gpt2 or vocab_given:
        return config
    return config.replace(vocab_size=tokenizer.vocab_size)


def save_run_tokenizer(out_dir: str | os.PathLike, tokenizer: Tokenizer) -> dict[str, str]:
    """Copies a trained tokenizer into the run folder; returns what the run file records about it."""
    if not tokenizer.is_gpt2:
        tokenizer.save(out_dir)
    return {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint}
