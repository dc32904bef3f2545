"""A run's directory, apart from its checkpoints: the run file and the metrics file.

Layout of a run's ``out_dir``::

    jaxgpt.json            the run description (model and train configs), written first
    metrics.jsonl          one JSON object per logged step, for plots and dashboards
    run.lock               while a training process owns the directory: its pid and host
    checkpoints/<step>/    Orbax steps (jaxgpt.checkpoint)

The run file marks a directory as a jaxgpt run: ``--init_from``, ``sample.py`` and
``python -m jaxgpt.eval`` recognise a checkpoint directory by it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from jaxgpt.core.errors import UserError
from jaxgpt.core.json_file import read_json, write_json
from jaxgpt.model.config import GPTConfig

RUN_FILE = "jaxgpt.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"


def make_run_dir(out_dir: str | os.PathLike) -> Path:
    """Creates ``out_dir`` (and parents); a path that is a file, or cannot be created, is a UserError."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out_dir {out_dir} is a file, not a directory; pass a directory path") from None
    except OSError as err:
        raise UserError(f"cannot create --out_dir {out_dir}: {err.strerror}") from None
    return out


class RunLock:
    """Exclusive ownership of a run directory by one training process (``with RunLock(out_dir):``).

    The lock file holds ``{"pid", "host"}`` and is created atomically (written aside, then hard-linked
    into place, which fails if it exists). A lock left by a dead process on this host is taken over
    with a message; a live one, or one from another host (whose pid cannot be checked), is an error.
    Multi-process runs take it on process 0 only.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_FILE
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        make_run_dir(self.path.parent)
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.owner))
        try:
            while not self._try_link(tmp):
                self._take_over_if_stale()
        finally:
            tmp.unlink()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._holder() == self.owner:
            self.path.unlink()

    def _try_link(self, tmp: Path) -> bool:
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: written by a process that died mid-write

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        if holder is None:
            return  # released meanwhile: try again
        pid, host = holder.get("pid"), holder.get("host")
        if host == self.owner["host"] and isinstance(pid, int) and _alive(pid):
            raise UserError(
                f"{self.path.parent} is in use by another training process (pid {pid}); wait for it to end, "
                "or pick another --out_dir"
            )
        if host not in (None, self.owner["host"]):
            raise UserError(
                f"{self.path.parent} is locked by process {pid} on host {host}; if no run is using it any more, "
                f"delete {self.path} and start again"
            )
        print(f"taking over {self.path}: its process ({pid}) is no longer running", file=sys.stderr)
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a jaxgpt run (a training out_dir or an exported model): its run file exists."""
    return (Path(path) / RUN_FILE).is_file()


def write_run_file(out_dir: str | os.PathLike, model: GPTConfig, train: dict[str, Any] | None = None) -> None:
    """Writes the run description."""
    make_run_dir(out_dir)
    write_json(Path(out_dir) / RUN_FILE, {"format": 1, "model": model.to_dict(), "train": train or {}})


def update_run_file(out_dir: str | os.PathLike, **fields: Any) -> None:
    """Sets top-level fields of the run file, e.g. the id of the run's W&B run."""
    write_json(Path(out_dir) / RUN_FILE, read_run_file(out_dir) | fields)


def read_run_file(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The run description; a damaged one is a UserError naming the file, never a traceback."""
    if not is_run_dir(out_dir):
        raise UserError(f"{out_dir} is not a jaxgpt run directory (no {RUN_FILE})")
    fix = "restore it from a copy, or start a new --out_dir"
    return read_json(Path(out_dir) / RUN_FILE, "model", dict, "has no 'model' section", fix)


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl``, in order.

    A cut-off last line (the process died mid-write) is dropped with a note; damage anywhere else is an error.
    """
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; train first (python train.py --out_dir {out_dir})")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            if n != lines[-1][0]:
                raise UserError(f"{path}:{n} is not a JSON record; fix or delete that line") from None
            print(f"note: ignoring the cut-off last line of {path} (line {n})", file=sys.stderr)
    return records


class MetricsWriter:
    """Appends one JSON object per line to ``out_dir/metrics.jsonl`` (only on process 0)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` as one line (arrays become floats); does nothing where not ``enabled``."""
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
