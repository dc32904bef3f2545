"""One entry for pretrained weights: a jaxgpt checkpoint directory, a HF GPT-2 directory or a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxgpt.model import GPT


def is_jaxgpt_checkpoint(path: str | os.PathLike) -> bool:
    """A training ``out_dir`` (or exported model) is recognised by its ``jaxgpt.json`` run description."""
    return (Path(path) / "jaxgpt.json").is_file()


def load_model(init_from: str | os.PathLike, **overrides: Any) -> GPT:
    """Loads a GPT for inference or fine-tuning; ``overrides`` change config fields (dtype, dropout...)."""
    if is_jaxgpt_checkpoint(init_from):
        from jaxgpt.checkpoint import load_model_from_checkpoint

        return load_model_from_checkpoint(init_from, **overrides)
    from jaxgpt.convert import load_hf_gpt2

    return load_hf_gpt2(init_from, **overrides)
