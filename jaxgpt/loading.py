"""One entry for pretrained weights: a jaxgpt checkpoint directory, a HF GPT-2 directory or a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxgpt.checkpoint import CHECKPOINT_DIR, load_model_from_checkpoint
from jaxgpt.convert import load_hf_gpt2
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.params import ParamCodec
from jaxgpt.run_dir import METRICS_FILE, RUN_FILE, is_run_dir

_all_finite = jax.jit(lambda params: {name: jnp.isfinite(value).all() for name, value in params.items()})


def load_model(init_from: str | os.PathLike, **overrides: Any) -> GPT:
    """Loads a GPT for inference or fine-tuning; ``overrides`` change config fields (dtype, dropout...).

    A training ``out_dir`` (or an exported model) is recognised by its run file, ``jaxgpt.json``.
    Weights holding NaN or Inf are refused here, not met later as garbage text or a NaN loss.
    """
    if is_run_dir(init_from):
        model = load_model_from_checkpoint(init_from, **overrides)
    else:
        model = load_hf_gpt2(init_from, **overrides)
    finite = jax.device_get(_all_finite(ParamCodec(model.config).to_flat(model)))
    bad = sorted(name for name, ok in finite.items() if not ok)
    if bad:
        raise UserError(
            f"{init_from}: {len(bad)} weight arrays hold NaN or Inf (first: {bad[0]}); the model is unusable, "
            "load an earlier checkpoint (a training run that diverged stops before saving such weights)"
        )
    return model


def newest_run(root: str | os.PathLike = "out") -> Path:
    """The run directory under ``root`` with checkpoints that was written to last (run file or metrics)."""
    root = Path(root)
    runs = (
        [p for p in sorted(root.iterdir()) if is_run_dir(p) and (p / CHECKPOINT_DIR).is_dir()] if root.is_dir() else []
    )
    if not runs:
        raise UserError(
            f"no training run with checkpoints under {root}/; train one first (python train.py) or pass --init_from"
        )
    written = lambda run: max(
        (run / name).stat().st_mtime for name in (RUN_FILE, METRICS_FILE) if (run / name).is_file()
    )
    return max(runs, key=written)
