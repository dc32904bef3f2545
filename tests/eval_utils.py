"""Shared by the evaluation tests: a tiny random GPT-2 in Hugging Face format and its log-probs."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxgpt.checkpoints.loading import load_model
from jaxgpt.model.gpt import GPT


class TinyGPT2(NamedTuple):
    dir: Path  # Hugging Face format, for transformers and the CLI
    model: GPT  # the same weights loaded by jaxgpt


def save_tiny_gpt2(path: Path, n_positions: int = 128, seed: int = 0) -> Path:
    """A 2-layer random GPT-2 with GPT-2's vocabulary, saved with ``save_pretrained``.

    The init is wider than GPT-2's (0.2, not 0.02) so the next-token distributions are far from
    uniform and the endings' scores differ by more than rounding.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=n_positions, vocab_size=50257,
                        initializer_range=0.2)  # fmt: skip
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


def tiny_gpt2(path: Path, n_positions: int = 128, seed: int = 0) -> TinyGPT2:
    save_tiny_gpt2(path, n_positions, seed)
    return TinyGPT2(path, load_model(path))


def hf_token_log_probs(model_dir: Path, rows: list[list[int]]) -> list[np.ndarray]:
    """For each token row, log p(row[i+1] | row[:i+1]) from transformers, float64 [len(row) - 1]."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor(row)
            logp = torch.log_softmax(
                model(ids[None, :-1]).logits[0].double(), dim=-1
            )  # the last token predicts nothing
            out.append(logp.gather(-1, ids[1:, None])[:, 0].numpy())
    return out
