"""A run's directory, apart from its checkpoints: the run file and the metrics file.

Layout of a run's ``out_dir``::

    jaxgpt.json            the run description (model and train configs), written first
    metrics.jsonl          one JSON object per logged step, for plots and dashboards
    checkpoints/<step>/    Orbax steps (jaxgpt.checkpoint)

The run file marks a directory as a jaxgpt run: ``--init_from``, ``sample.py`` and
``python -m jaxgpt.eval`` recognise a checkpoint directory by it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError

RUN_FILE = "jaxgpt.json"
METRICS_FILE = "metrics.jsonl"


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def write_run_file(out_dir: str | os.PathLike, model: GPTConfig, train: dict[str, Any] | None = None) -> None:
    """Writes the run description."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_atomically(out_dir, {"format": 1, "model": model.to_dict(), "train": train or {}})


def update_run_file(out_dir: str | os.PathLike, **fields: Any) -> None:
    """Sets top-level fields of the run file, e.g. the id of the run's W&B run."""
    _write_atomically(out_dir, read_run_file(out_dir) | fields)


def _write_atomically(out_dir: str | os.PathLike, description: dict[str, Any]) -> None:
    """A temporary file, then a rename: a crash never leaves half a run file."""
    tmp = Path(out_dir) / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(description, indent=2))
    os.replace(tmp, Path(out_dir) / RUN_FILE)


def read_run_file(out_dir: str | os.PathLike) -> dict[str, Any]:
    if not is_run_dir(out_dir):
        raise UserError(f"{out_dir} is not a jaxgpt run directory (no {RUN_FILE})")
    return json.loads((Path(out_dir) / RUN_FILE).read_text())


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl``, in order."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; train first (python train.py --out_dir {out_dir})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends one JSON object per line to ``out_dir/metrics.jsonl`` (only on process 0)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drops lines logged after the checkpoint so the file reads as one clean run."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [record for record in read_metrics(self.out_dir) if record.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
