"""Random Hugging Face GPT-2 models saved to disk: the reference for converter and parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_hf_gpt2(path: Path, *, n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, seed=0):
    """Saves a randomly initialised ``GPT2LMHeadModel`` with ``save_pretrained`` and returns it (eval mode)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=vocab_size,
        bos_token_id=min(50256, vocab_size - 1), eos_token_id=min(50256, vocab_size - 1),
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # default init has zero biases and unit LayerNorms: perturb them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
