"""Orbax checkpoints that resume exactly: parameters, optimizer state, step, RNG and data position.

A run's checkpoints live in ``out_dir/checkpoints/<step>/``, one Orbax step each with the items
params, train, data and meta (the rest of ``out_dir`` is ``jaxgpt.checkpoints.run_dir``'s). Orbax writes
each step into a temporary directory and renames it when complete, so a process killed
mid-save leaves no step that looks whole; ``latest_step`` only sees finished ones.
Restores are checked against the config first (every parameter's shape), because
Orbax would otherwise restore a differently sized model partially and silently, and
they target explicit shardings so a large model lands sharded, never whole on one device.

Every save stores a checksum of each array (``jaxgpt.checkpoints.fingerprint``) in its meta item, and every
restore verifies them: a step whose bytes changed, or that Orbax cannot read, is reported by
name and the newest intact step is used instead (a training run moves the bad one aside to
``out_dir/corrupt-checkpoints/``). A background save that fails stops the run at the next step
with one line naming the step and the cause; the steps saved before it are untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgpt.checkpoints.fingerprint import fingerprints, mismatches
from jaxgpt.checkpoints.state import TrainState
from jaxgpt.core.errors import UserError
from jaxgpt.model.params import Params

CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "corrupt-checkpoints"
T = TypeVar("T")


class CorruptCheckpointError(UserError):
    """A saved step cannot be read back, or its arrays differ from the checksums saved with them."""

    def __init__(self, directory: Path, step: int, cause: str):
        super().__init__(f"checkpoint step {step} in {directory} is corrupt ({cause})")
        self.step = step


class SaveFailedError(UserError):
    """Writing a checkpoint failed (disk full, permissions...); the steps saved before it are intact."""


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs a failed save as hundreds of traceback lines; the run reports it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


_QUIET_ORBAX = _QuietOrbaxErrors()


def _cause(err: BaseException) -> str:
    """The innermost cause's first line: what the user can act on (ENOSPC, a path), not the stack."""
    while err.__cause__ is not None:
        err = err.__cause__
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:300]}"


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

    def __init__(
        self, out_dir: str | os.PathLike, *, keep_last: int = 3, async_save: bool = True, read_only: bool = False
    ):
        """``read_only`` (sampling, evaluation) never creates, cleans or deletes anything in ``out_dir``."""
        self.out_dir = Path(out_dir).absolute()
        self.directory = self.out_dir / CHECKPOINT_DIR
        self.pending_step: int | None = None  # an asynchronous save not yet known to have succeeded
        self.read_only = read_only
        logging.getLogger("absl").addFilter(_QUIET_ORBAX)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else _preservation(keep_last),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,  # (Orbax's own read_only option logs warnings on every open)
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest saved step (None before the first save), intact or not: ``newest_intact`` checks."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every step with a checkpoint on disk."""
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
        train = _train_item(state)
        checksums = {"params": fingerprints(state.params), "train": fingerprints(train)}
        self.save_items(
            step,
            ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(train),
                data=ocp.args.JsonSave(data_state or {}),
                meta=ocp.args.JsonSave({**meta, "step": step, "val_loss": val_loss, "checksums": checksums}),
            ),
            metrics={"val_loss": float(val_loss)} if val_loss is not None else None,
        )

    def save_items(self, step: int, args: ocp.args.Composite, metrics: dict[str, float] | None = None) -> None:
        """Saves Orbax items at ``step``; any failure, now or in the background, becomes a SaveFailedError."""
        self.wait()  # a failed earlier save is reported before anything else is written
        self.pending_step = step
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as err:  # the synchronous part failed (directory creation, a full disk...)
            raise self._save_failed(err) from None

    def _save_failed(self, err: BaseException) -> SaveFailedError:
        step, self.pending_step = self.pending_step, None
        kept = self.all_steps()
        intact = f"step {max(kept)} is the last intact checkpoint" if kept else "no checkpoint was saved before it"
        return SaveFailedError(f"saving checkpoint step {step} in {self.directory} failed ({_cause(err)}); {intact}")

    def check_save(self) -> None:
        """Raises :class:`SaveFailedError` as soon as a finished background save is known to have failed."""
        if self.pending_step is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def restore(self, step: int, target: TrainState, shardings: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restores a full training state into ``shardings`` after checking every parameter's shape."""
        abstract = jax.tree.map(_abstract_with_sharding, target, shardings)
        restored = self._restore_verified(
            step,
            abstract.params,
            train=ocp.args.StandardRestore(_train_item(abstract)),
            data=ocp.args.JsonRestore(),
        )
        train = restored["train"]
        state = TrainState(train["step"], restored["params"], train["opt_state"], train["first_bad_step"], train["rng"])
        return state, dict(restored["data"] or {})

    def restore_params(self, step: int, abstract: dict[str, jax.ShapeDtypeStruct]) -> Params:
        """The parameters of ``step`` alone (no optimizer state), placed as ``abstract`` says and checked
        against their saved checksums."""
        return self._restore_verified(step, abstract)["params"]

    def _restore_verified(self, step: int, params: dict[str, Any], **items: Any) -> dict[str, Any]:
        """Restores ``params`` and ``items`` of ``step`` and checks every array against its saved checksum."""
        check_params_match(self, step, params)  # a config mistake, not corruption: raised as is
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(params=ocp.args.StandardRestore(params), meta=ocp.args.JsonRestore(), **items),
            )
        except Exception as err:  # truncated or deleted files, a garbage manifest: Orbax's errors vary
            raise CorruptCheckpointError(self.directory, step, _cause(err)) from None
        checksums = (restored["meta"] or {}).get("checksums", {})  # checkpoints from before checksums: none
        for item, stored in checksums.items():
            bad = mismatches(stored, restored[item]) if item in restored else []
            if bad:
                cause = f"{len(bad)} arrays differ from their checksums: {bad[0]}"
                raise CorruptCheckpointError(self.directory, step, cause)
        return restored

    def newest_intact(self, restore: Callable[[int], T], *, quarantine: bool) -> tuple[int, T] | None:
        """``(step, restore(step))`` for the newest step that restores intact; corrupt ones are reported.

        ``quarantine`` (a training run, process 0) moves each corrupt step to ``out_dir/corrupt-checkpoints/``
        so the run can save that step number again; readers (sampling, evaluation) leave it in place.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, restore(step)
            except CorruptCheckpointError as err:
                action = f"moved it to {self._quarantine(step)}" if quarantine else "skipped it"
                print(f"warning: {err}; {action}, falling back to the step before", file=sys.stderr)
        return None

    def _quarantine(self, step: int) -> Path:
        destination = self.out_dir / QUARANTINE_DIR / str(step)
        destination.parent.mkdir(exist_ok=True)
        shutil.rmtree(destination, ignore_errors=True)  # an older quarantined copy of the same step number
        os.replace(self.directory / str(step), destination)
        self.manager.reload()
        return destination

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk; raises :class:`SaveFailedError` if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            if self.pending_step is None:  # already reported
                return
            raise self._save_failed(err) from None
        self.pending_step = None

    def close(self) -> None:
        """Waits for a save in flight, then releases Orbax's manager (and its cleanup thread)."""
        try:
            self.wait()
        finally:
            # Orbax starts removing stale temporary steps in a thread when the manager opens and close() does
            # not join it; a process that exits before it ends prints a traceback. (Private API, hence getattr.)
            getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
            self.manager.close()
            if not self.read_only and self.directory.is_dir() and not any(self.directory.iterdir()):
                self.directory.rmdir()  # a run that failed before its first save leaves no empty folder


def _train_item(state: TrainState) -> dict[str, Any]:
    """What the ``train`` item stores: the state apart from the parameters."""
    return {"step": state.step, "opt_state": state.opt_state, "first_bad_step": state.first_bad_step, "rng": state.rng}


def _abstract_with_sharding(value: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=sharding)


def check_params_match(checkpointer: Checkpointer, step: int, expected: dict[str, Any]) -> None:
    """A clear error (not a silent partial restore) when the checkpoint's parameters differ from the config."""
    try:
        stored = checkpointer.manager.item_metadata(step)["params"]
    except Exception as err:  # an unreadable manifest
        raise CorruptCheckpointError(checkpointer.directory, step, _cause(err)) from None
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
