"""jaxgpt: GPT-2 in JAX, every stage from tokenizer to chat.

The public API. Each name is imported on first use, so ``python -m jaxgpt.<stage>`` pays only
for what that stage needs::

    from jaxgpt import GPT, GPTConfig, load_model, generate

The sub-packages are the architecture, each importing only from those before it:
``core`` -> ``tokenizer`` -> ``model`` -> ``sampling`` -> ``chat`` -> ``data`` -> ``convert``
-> ``checkpoints`` -> ``eval`` -> ``train`` -> ``plan`` -> ``rl`` -> ``serve``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "UserError": "jaxgpt.core.errors",
    "make_mesh": "jaxgpt.core.sharding",
    "shard_model": "jaxgpt.core.sharding",
    "Tokenizer": "jaxgpt.tokenizer",
    "load_tokenizer": "jaxgpt.tokenizer",
    "tokenizer_of": "jaxgpt.tokenizer",
    "GPTConfig": "jaxgpt.model.config",
    "preset": "jaxgpt.model.config",
    "GPT": "jaxgpt.model.gpt",
    "ParamCodec": "jaxgpt.model.params",
    "generate": "jaxgpt.sampling.generate",
    "SamplingRule": "jaxgpt.sampling.generate",
    "generate_reply": "jaxgpt.chat.reply",
    "render": "jaxgpt.chat.template",
    "load_hf_gpt2": "jaxgpt.convert",
    "save_hf_gpt2": "jaxgpt.convert",
    "load_model": "jaxgpt.checkpoints.loading",
    "save_model": "jaxgpt.checkpoints.loading",
    "evaluate_loss": "jaxgpt.eval",
    "evaluate_hellaswag": "jaxgpt.eval",
    "TrainConfig": "jaxgpt.train.config",
    "parse_run_config": "jaxgpt.train.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
