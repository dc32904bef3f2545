"""A training run's start and end as the user sees them: starting over, refusing a run with nothing
left to do, leaving no empty folder behind a failed start, and the summary printed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from jaxgpt.checkpoints.checkpointer import CHECKPOINT_DIR, Checkpointer
from jaxgpt.checkpoints.run_dir import METRICS_FILE, RUN_FILE, read_metrics
from jaxgpt.core import distributed
from jaxgpt.core.errors import UserError
from jaxgpt.train.tracking import TENSORBOARD_DIR


def start_fresh(out_dir: str | os.PathLike) -> None:
    """``--fresh``: deletes what an earlier run left in ``out_dir`` (checkpoints, metrics, run file, events).

    Process 0 deletes; every process waits for it before looking for checkpoints.
    """
    if distributed.is_main_process():
        out = Path(out_dir)
        for name in (CHECKPOINT_DIR, TENSORBOARD_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (METRICS_FILE, RUN_FILE):
            (out / name).unlink(missing_ok=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxgpt --fresh")


def check_not_complete(out_dir: str | os.PathLike, step: int, max_steps: int) -> None:
    """A finished run asked to train again would do nothing: say how to continue or start over instead."""
    if step >= max_steps:
        raise UserError(
            f"the run in {out_dir} is complete ({step} of --max_steps {max_steps} steps done); to train it "
            f"further pass a larger --max_steps (e.g. --max_steps {2 * max_steps}), to start over pass --fresh "
            "(deletes its checkpoints) or a new --out_dir"
        )


@contextlib.contextmanager
def removed_if_left_empty(out_dir: str | os.PathLike) -> Iterator[None]:
    """Runs the body; if it fails and ``out_dir`` did not exist before and holds no file, removes it."""
    out = Path(out_dir)
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def summary(out_dir: str | os.PathLike, seconds: float, steps: int, tokens: int, checkpointer: Checkpointer) -> str:
    """What the run did (this session's steps, tokens and time), where its checkpoint is, and what to run next."""
    last = checkpointer.latest_step()
    checkpoint = None if last is None else Path(out_dir) / CHECKPOINT_DIR / str(last)
    records = [r for r in read_metrics(out_dir) if r.get("val_loss") is not None]
    lines = [f"done: {steps:,} steps, {tokens:,} tokens in {_duration(seconds)}"]
    if records:
        best = min(records, key=lambda r: r["val_loss"])
        lines.append(f"val loss: final {_loss(records[-1])}, best {_loss(best)} at step {best['step']}")
    lines.append(f"checkpoint: {checkpoint if checkpoint is not None else 'none written'}")
    lines += [
        "next:",
        f'  python sample.py --init_from {out_dir} --prompt "ROMEO:"',
        f"  python sample.py --init_from {out_dir} --chat",
        f"  python -m jaxgpt.serve --init_from {out_dir}",
        f"  python -m jaxgpt.plot {out_dir}",
    ]
    return "\n".join(lines)


def _loss(record: dict[str, Any]) -> str:
    text = f"{record['val_loss']:.4f}"
    return text + (f" ({record['val_bpb']:.3f} bits/byte)" if record.get("val_bpb") is not None else "")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"
