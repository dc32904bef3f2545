"""Orbax checkpoints that resume exactly: parameters, optimizer state, step, RNG and data position.

A run's checkpoints live in ``out_dir/checkpoints/<step>/``, one Orbax step each with the items
params, train, data and meta (the rest of ``out_dir`` is ``jaxgpt.run_dir``'s). Orbax writes
each step into a temporary directory and renames it when complete, so a process killed
mid-save leaves no step that looks whole; ``latest_step`` only sees finished ones.
Restores are checked against the config first (every parameter's shape), because
Orbax would otherwise restore a differently sized model partially and silently, and
they target explicit shardings so a large model lands sharded, never whole on one device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.params import ParamCodec, Params
from jaxgpt.run_dir import read_run_file, write_run_file
from jaxgpt.sharding import make_mesh
from jaxgpt.train_state import TrainState

CHECKPOINT_DIR = "checkpoints"


def _preservation(keep_last: int):
    """Keep the last N steps, plus the step with the lowest validation loss."""
    cm = ocp.checkpoint_managers
    return cm.AnyPreservationPolicy(
        policies=[
            cm.LatestN(n=keep_last),
            cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ]
    )


class Checkpointer:
    """A run's checkpoints: asynchronous saves, verified restores."""

    def __init__(self, out_dir: str | os.PathLike, *, keep_last: int = 3, async_save: bool = True):
        self.directory = Path(out_dir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_preservation(keep_last),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        state: TrainState,
        *,
        data_state: dict[str, Any] | None,
        meta: dict[str, Any],
        val_loss: float | None = None,
    ) -> None:
        """Starts an asynchronous save of ``state`` at its step (returns before the bytes are written)."""
        step = int(state.step)
        train = {
            "step": state.step,
            "opt_state": state.opt_state,
            "first_bad_step": state.first_bad_step,
            "rng": state.rng,
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(train),
                data=ocp.args.JsonSave(data_state or {}),
                meta=ocp.args.JsonSave({**meta, "step": step, "val_loss": val_loss}),
            ),
            metrics={"val_loss": float(val_loss)} if val_loss is not None else None,
            force=True,
        )

    def restore(self, step: int, target: TrainState, shardings: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restores a full training state into ``shardings`` after checking every parameter's shape."""
        check_params_match(self, step, target.params)
        abstract = jax.tree.map(_abstract_with_sharding, target, shardings)
        train_target = {
            "step": abstract.step,
            "opt_state": abstract.opt_state,
            "first_bad_step": abstract.first_bad_step,
            "rng": abstract.rng,
        }
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                train=ocp.args.StandardRestore(train_target),
                data=ocp.args.JsonRestore(),
            ),
        )
        train = restored["train"]
        state = TrainState(train["step"], restored["params"], train["opt_state"], train["first_bad_step"], train["rng"])
        return state, dict(restored["data"] or {})

    def restore_params(self, step: int, abstract: dict[str, jax.ShapeDtypeStruct]) -> Params:
        check_params_match(self, step, abstract)
        restored = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
        return restored["params"]

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk; call before exiting."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        # Orbax starts removing stale temporary steps in a thread when the manager opens and close() does
        # not join it; a process that exits before it ends prints a traceback. (Private API, hence getattr.)
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self.manager.close()


def _abstract_with_sharding(value: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=sharding)


def check_params_match(checkpointer: Checkpointer, step: int, expected: dict[str, Any]) -> None:
    """A clear error (not a silent partial restore) when the checkpoint's parameters differ from the config."""
    stored = checkpointer.manager.item_metadata(step)["params"]
    if stored is None:
        raise UserError(f"checkpoint step {step} in {checkpointer.directory} has no parameters")
    stored_shapes = {name: tuple(meta.shape) for name, meta in stored.items()}
    wanted = {name: tuple(value.shape) for name, value in expected.items()}
    if stored_shapes != wanted:
        differing = sorted(n for n in wanted.keys() | stored_shapes.keys() if stored_shapes.get(n) != wanted.get(n))
        first = differing[0]
        raise UserError(
            f"checkpoint {checkpointer.directory}/{step} does not fit the model config: {first} is "
            f"{stored_shapes.get(first, 'missing')} in the checkpoint but {wanted.get(first, 'absent')} in the "
            f"config ({len(differing)} parameters differ). Use the checkpoint's model flags, or a new --out_dir."
        )


def save_model(model: GPT, out_dir: str | os.PathLike, step: int = 0) -> Path:
    """Writes a model alone (no optimizer state) as a jaxgpt checkpoint that --init_from and sample.py read."""
    write_run_file(out_dir, model.config)
    checkpointer = Checkpointer(out_dir, keep_last=1, async_save=False)
    params = ParamCodec(model.config).to_flat(model)
    checkpointer.manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            meta=ocp.args.JsonSave({"step": step, "model": model.config.to_dict()}),
        ),
        force=True,
    )
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
    config = GPTConfig.from_dict({**run["model"], **overrides})
    stored = GPTConfig.from_dict(run["model"])
    checkpointer = Checkpointer(out_dir, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise UserError(f"{out_dir} holds no complete checkpoint yet")
    stored_codec = ParamCodec(config.replace(param_dtype=stored.param_dtype))  # restore as saved, then cast
    mesh = mesh or make_mesh("1x1", jax.local_devices()[:1])  # this process's first device
    shardings = stored_codec.shardings(mesh)
    abstract = {
        n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings[n]) for n, a in stored_codec.abstract.items()
    }
    params = checkpointer.restore_params(step, abstract)
    checkpointer.close()
    codec = ParamCodec(config)
    return codec.to_model(codec.cast(params))
