"""Run tracking beside ``metrics.jsonl``: TensorBoard and Weights & Biases.

The trainer hands every record it writes to ``metrics.jsonl`` to :meth:`Trackers.log` and every
printed sample to :meth:`Trackers.log_text`; each tracker turned on by the flags gets them:

- ``--tensorboard``: scalars (one tag per metric name, as in ``metrics.jsonl``), the samples and
  the run's configs as text, in ``out_dir/tb`` (tensorboardX writes the event files: no TensorFlow).
- ``--wandb_project NAME``: the same to Weights & Biases, with the configs as the run's config.

Only process 0 logs. A resumed run continues the same curves: TensorBoard is told to drop what
was logged after the checkpoint (``purge_step``, as ``metrics.jsonl`` is truncated), and W&B
resumes the run whose id the run file keeps (``wandb_run_id`` in ``jaxgpt.json``). W&B only
accepts increasing steps, so steps logged after the checkpoint are not logged again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from jaxgpt.checkpoints.run_dir import read_run_file, update_run_file
from jaxgpt.core.errors import UserError

TENSORBOARD_DIR = "tb"
WANDB_RUN_ID = "wandb_run_id"


def check_tracker_installed(*, tensorboard: bool, wandb_project: str | None) -> None:
    """A user error before any work if a tracker asked for is not installed (both are optional extras)."""
    for wanted, package in ((tensorboard, "tensorboardX"), (wandb_project, "wandb")):
        if wanted and importlib.util.find_spec(package) is None:
            raise UserError(f"{package} is not installed: pip install -r requirements-tracking.txt")


class Tracker(Protocol):
    """What an experiment tracker (TensorBoard, W&B) does for a run: scalars and texts by step, then close."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """The scalars of ``step``."""

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A text (a sample) under ``tag`` at ``step``."""

    def close(self) -> None:
        """Writes out what is buffered and ends the tracker's run."""


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers but its step (None, e.g. MFU on an unknown device, is left out)."""
    return {k: float(v) for k, v in record.items() if k != "step" and v is not None and not isinstance(v, (str, bool))}


class TensorBoardTracker:
    """Event files in ``out_dir/tb``; a resumed run purges the steps after ``start_step``."""

    def __init__(self, out_dir: str | os.PathLike, configs: dict[str, Any], start_step: int):
        from tensorboardX import SummaryWriter

        purge_step = start_step + 1 if start_step else None  # TensorBoard hides events from this step on
        self.writer = SummaryWriter(
            str(Path(out_dir) / TENSORBOARD_DIR), purge_step=purge_step, filename_suffix=f".from{start_step:09d}"
        )  # the suffix keeps a resume in the same second from overwriting the file before it
        if start_step == 0:
            self.writer.add_text("config", "```\n" + json.dumps(configs, indent=2) + "\n```", 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Each scalar as its own curve, flushed so that TensorBoard shows it at once."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        """``text`` as a code block under ``tag``."""
        self.writer.add_text(tag, "```\n" + text + "\n```", step)  # a code block keeps the sample's line breaks
        self.writer.flush()

    def close(self) -> None:
        """Closes the event file."""
        self.writer.close()


class WandbTracker:
    """One W&B run per ``out_dir``: its id is kept in the run file, so a resumed run logs to the same run."""

    def __init__(self, out_dir: str | os.PathLike, project: str, configs: dict[str, Any]):
        import wandb

        run_id = read_run_file(out_dir).get(WANDB_RUN_ID)
        if run_id is None:
            run_id = secrets.token_hex(8)
            update_run_file(out_dir, **{WANDB_RUN_ID: run_id})
        self.run = wandb.init(
            project=project, id=run_id, resume="allow", name=Path(out_dir).resolve().name, dir=str(out_dir),
            config=configs,
        )  # fmt: skip

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """The scalars of ``step``, unless W&B has seen the step already (after a resume)."""
        if step >= self.run.step:  # W&B drops (with a warning) steps it has already seen
            self.run.log(scalars, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """``text`` as preformatted HTML at ``step``, unless W&B has seen the step already."""
        import wandb

        if step >= self.run.step:
            self.run.log({tag: wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def close(self) -> None:
        """Finishes the W&B run."""
        self.run.finish()


class Trackers:
    """Every tracker the run's flags turned on (none on processes other than 0)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict[str, Any]) -> None:
        """A ``metrics.jsonl`` record: its step and metrics."""
        scalars = scalars_of(record)
        for tracker in self.trackers:
            tracker.log(record["step"], scalars)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """The text to every tracker."""
        for tracker in self.trackers:
            tracker.log_text(step, tag, text)

    def close(self) -> None:
        """Closes every tracker."""
        for tracker in self.trackers:
            tracker.close()


def open_trackers(
    out_dir: str | os.PathLike,
    *,
    tensorboard: bool,
    wandb_project: str | None,
    configs: dict[str, Any],
    start_step: int,
    enabled: bool = True,
) -> Trackers:
    """The trackers for a run in ``out_dir`` starting (or resuming) at ``start_step``; ``enabled``: process 0."""
    trackers: list[Tracker] = []
    if enabled and tensorboard:
        trackers.append(TensorBoardTracker(out_dir, configs, start_step))
    if enabled and wandb_project:
        trackers.append(WandbTracker(out_dir, wandb_project, configs))
    return Trackers(trackers)
