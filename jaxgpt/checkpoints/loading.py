"""A model to and from disk: ``save_model`` writes one as a jaxgpt run directory; ``load_model`` reads a
run directory, a Hugging Face GPT-2 directory or a hub id; ``load_sharded`` also places it on a mesh,
as sample.py, ``python -m jaxgpt.eval`` and the lm-eval harness do (``LoadConfig``: their shared flags)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxgpt.checkpoints.checkpointer import CHECKPOINT_DIR, Checkpointer
from jaxgpt.checkpoints.fingerprint import fingerprints
from jaxgpt.checkpoints.run_dir import METRICS_FILE, RUN_FILE, is_run_dir, read_run_file, write_run_file
from jaxgpt.convert import load_hf_gpt2
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.core.sharding import make_mesh, shard_model
from jaxgpt.model.config import DType, GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.model.params import ParamCodec


def save_model(model: GPT, out_dir: str | os.PathLike, step: int = 0) -> Path:
    """Writes a model alone (no optimizer state) as a jaxgpt checkpoint that --init_from and sample.py read."""
    write_run_file(out_dir, model.config)
    checkpointer = Checkpointer(out_dir, keep_last=1, async_save=False)
    params = ParamCodec(model.config).to_flat(model)
    meta = {"step": step, "model": model.config.to_dict(), "checksums": {"params": fingerprints(params)}}
    items = ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    checkpointer.save_items(step, items)
    checkpointer.close()
    return Path(out_dir)


def load_model_from_checkpoint(
    out_dir: str | os.PathLike, *, step: int | None = None, mesh: Mesh | None = None, **overrides: Any
) -> GPT:
    """The model of a run's latest (or given) checkpoint, for sampling, evaluation or fine-tuning.

    ``overrides`` change non-shape config fields (dtype, dropout, attention...). Parameters keep their
    stored float32 unless ``param_dtype`` is overridden.
    """
    run = read_run_file(out_dir)
    overrides.pop("pad_vocab_multiple", None)  # the table's shape: the checkpoint's padding wins (fine-tuning asks)
    config = GPTConfig.from_dict({**run["model"], **overrides})
    stored = GPTConfig.from_dict(run["model"])
    stored_codec = ParamCodec(config.replace(param_dtype=stored.param_dtype))  # restore as saved, then cast
    mesh = mesh or make_mesh("1x1", jax.local_devices()[:1])  # this process's first device
    shardings = stored_codec.shardings(mesh)
    abstract = {
        n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings[n]) for n, a in stored_codec.abstract.items()
    }
    checkpointer = Checkpointer(out_dir, async_save=False, read_only=True)
    try:
        if step is not None:
            params = checkpointer.restore_params(step, abstract)
        else:
            found = checkpointer.newest_intact(lambda s: checkpointer.restore_params(s, abstract), quarantine=False)
            if found is None:
                raise UserError(f"{out_dir} holds no complete, intact checkpoint")
            params = found[1]
    finally:
        checkpointer.close()
    codec = ParamCodec(config)
    return codec.to_model(codec.cast(params))


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


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """The flags of every command that loads a model to run it: which model, on which mesh, in which dtype."""

    init_from: str | None = option(
        None, "training run directory, Hugging Face GPT-2 directory or hub id (default: the newest run under out/)"
    )
    mesh: str | None = option(None, "device mesh DxM (data x model); default: every device on data")
    dtype: DType = option("float32", "compute dtype of the model")


def load_sharded(init_from: str | os.PathLike, mesh_spec: str | None = None, **overrides: Any) -> tuple[GPT, Mesh]:
    """``load_model``, then its parameters placed on the (data, model) mesh ``mesh_spec`` (``DxM``); the
    mesh is checked before the (slow) load. The default, ``None``, is every jaxgpt command's: every device
    on the data axis, the model replicated."""
    mesh = make_mesh(mesh_spec)
    return shard_model(load_model(init_from, **overrides), mesh), mesh


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


def resolve_init_from(init_from: str | os.PathLike | None) -> str:
    """``init_from`` as given, or (None) the newest run under ``out/``, said on stderr: every command that
    loads a model defaults to the run just trained."""
    if init_from is not None:
        return str(init_from)
    newest = str(newest_run())
    print(f"using {newest}, the newest run under out/ (--init_from picks another)", file=sys.stderr)
    return newest
