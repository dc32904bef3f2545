"""``--profile_steps A:B``: a JAX profiler trace of training steps A to B-1 in ``out_dir/profile``.

Step ``n`` is the one that starts with ``n`` steps done (``10:15`` traces the 11th to the 15th
step, five in all; start past the first steps, which compile). Each step is annotated with
``jax.profiler.StepTraceAnnotation``, so TensorBoard's profile plugin shows a step-time
breakdown; a Perfetto trace (``perfetto_trace.json.gz``) is written beside the XPlane file.
Only process 0 traces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from jaxgpt.core.errors import UserError

PROFILE_DIR = "profile"


def parse_profile_steps(spec: str | None) -> range | None:
    """``"A:B"`` as ``range(A, B)``; None stays None; anything else is a user error."""
    if spec is None:
        return None
    start, sep, stop = spec.partition(":")
    if not (sep and start.isdigit() and stop.isdigit() and int(start) < int(stop)):
        raise UserError(f"--profile_steps {spec!r}: expected START:STOP with 0 <= START < STOP, e.g. 10:15")
    return range(int(start), int(stop))


class StepProfiler:
    """Starts the trace before the first step of ``steps``, annotates each step, stops after the last."""

    def __init__(self, steps: range | None, out_dir: str | os.PathLike, enabled: bool = True):
        self.steps = steps if enabled else None
        self.log_dir = Path(out_dir) / PROFILE_DIR
        self.tracing = False

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around the dispatch of one training step."""
        if self.steps is None or step not in self.steps:
            yield
            return
        if not self.tracing:
            jax.profiler.start_trace(str(self.log_dir), create_perfetto_trace=True)
            self.tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield

    def step_done(self, step: int, outputs: Any) -> None:
        """After a step: at the window's last step, waits for ``outputs`` and writes the trace."""
        if self.tracing and step == self.steps[-1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        """Writes the trace if one is running (also when training ends inside the window)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
