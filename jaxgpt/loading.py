"""One entry for pretrained weights: a jaxgpt checkpoint directory, a HF GPT-2 directory or a hub id."""

from __future__ import annotations

import os
from typing import Any

from jaxgpt.checkpoint import load_model_from_checkpoint
from jaxgpt.convert import load_hf_gpt2
from jaxgpt.model import GPT
from jaxgpt.run_dir import is_run_dir


def load_model(init_from: str | os.PathLike, **overrides: Any) -> GPT:
    """Loads a GPT for inference or fine-tuning; ``overrides`` change config fields (dtype, dropout...).

    A training ``out_dir`` (or an exported model) is recognised by its run file, ``jaxgpt.json``.
    """
    if is_run_dir(init_from):
        return load_model_from_checkpoint(init_from, **overrides)
    return load_hf_gpt2(init_from, **overrides)
