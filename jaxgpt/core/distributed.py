"""Launching one program on many processes (hosts), and ending all of them when one fails.

Every process runs the same command; ``jax.distributed.initialize`` connects them, after which
``jax.devices()`` lists every process's devices and a mesh may span them all. Two ways in:

* ``--distributed``: read the cluster's environment (SLURM, Open MPI, TPU pods);
* ``--coordinator_address HOST:PORT --num_processes N --process_id I``: anywhere else
  (``--local_device_ids`` picks this process's GPUs).

A multi-process run must never hang on a peer that is gone. Connecting is bounded by
``--init_timeout``; a process that stops after that (an error, a crash, a kill) stops sending
heartbeats, and after ``--heartbeat_timeout`` seconds every other process prints one ``error:``
line and exits. A process that fails itself prints its ``error:`` line and leaves at once
(:func:`exit_process`) rather than waiting at JAX's shutdown barrier for peers that will never come.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import sys
import threading
import time
from typing import Any

import jax
from jax._src import distributed as jax_distributed  # its client (a key-value store): as Orbax reads it
from jax.experimental import multihost_utils

from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option

PEER_FAILURE_EXIT_CODE = 3
FAILED_KEY = "jaxgpt/failed/"  # a process that fails sets FAILED_KEY + its index
POLL_SECONDS = 1.0
CONNECT_GRACE_SECONDS = 10  # JAX's own connect deadline comes this much after ours


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Multi-process launch: every process runs the same command (see the README's Multi-host section)."""

    distributed: bool = option(False, "multi-process: read the cluster's environment (SLURM, Open MPI, TPU pods)")
    coordinator_address: str | None = option(None, "multi-process without a scheduler: HOST:PORT of process 0")
    num_processes: int | None = option(None, "with --coordinator_address: how many processes the run has")
    process_id: int | None = option(None, "with --coordinator_address: this process's id, 0 .. num_processes-1")
    local_device_ids: str | None = option(
        None, "comma-separated GPU ids this process uses; none: all of them (SLURM, Open MPI: its local rank)"
    )
    init_timeout: int = option(300, "seconds to wait for every process to connect (and, at exit, to finish)")
    heartbeat_timeout: int = option(100, "seconds without a heartbeat after which a process counts as dead")

    def __post_init__(self) -> None:
        explicit = {"--num_processes": self.num_processes, "--process_id": self.process_id}
        if self.coordinator_address is not None:
            missing = [name for name, value in explicit.items() if value is None]
            if missing:
                raise UserError(f"--coordinator_address needs {' and '.join(missing)} as well")
            host, _, port = self.coordinator_address.rpartition(":")
            if not host or not port.isdigit():
                raise UserError(f"--coordinator_address must look like HOST:PORT, got {self.coordinator_address!r}")
            if not 0 <= self.process_id < self.num_processes:
                raise UserError(f"need 0 <= --process_id < --num_processes, got {self.process_id} and "
                                f"{self.num_processes}")  # fmt: skip
        elif not self.distributed and any(v is not None for v in explicit.values()):
            raise UserError("--num_processes and --process_id need --coordinator_address HOST:PORT (or --distributed)")
        if self.init_timeout < 1 or self.heartbeat_timeout < 1:
            raise UserError("--init_timeout and --heartbeat_timeout must be at least 1 second")
        if self.local_device_ids is not None:
            self.device_ids()  # fail on a malformed list before connecting

    @property
    def enabled(self) -> bool:
        """Whether this process joins a multi-process run (--distributed, or a coordinator address given)."""
        return self.distributed or self.coordinator_address is not None

    def device_ids(self) -> list[int] | None:
        """--local_device_ids as integers (None: every local device); a malformed list is a UserError."""
        if self.local_device_ids is None:
            return None
        try:
            return [int(i) for i in self.local_device_ids.split(",")]
        except ValueError as err:
            raise UserError(
                f"--local_device_ids must be comma-separated integers, got {self.local_device_ids!r}"
            ) from err


def initialize(config: LaunchConfig) -> None:
    """Connects this process to the others (before anything touches a device); a no-op for one process."""
    if not config.enabled:
        return
    explicit = config.coordinator_address is not None
    where = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "the coordinator")
    # XLA aborts the process (a C++ stack trace) when connecting times out: this timer ends it first.
    timer = threading.Timer(config.init_timeout, _connect_timed_out, args=(where, config.init_timeout))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
            local_device_ids=config.device_ids(),
            cluster_detection_method="deactivate" if explicit else None,
            initialization_timeout=config.init_timeout + CONNECT_GRACE_SECONDS,
            heartbeat_timeout_seconds=config.heartbeat_timeout,
            shutdown_timeout_seconds=config.init_timeout,
        )
    except ValueError as err:  # JAX found no cluster environment
        raise UserError(
            f"--distributed found no cluster environment ({err}); outside SLURM, Open MPI or a TPU pod pass "
            "--coordinator_address HOST:PORT --num_processes N --process_id I"
        ) from err
    except RuntimeError as err:  # e.g. JAX was used before this call
        raise UserError(f"could not start the multi-process run through {where}: {_first_line(err)}") from err
    finally:
        timer.cancel()
    _watchdog.start()


def _connect_timed_out(where: str, seconds: int) -> None:
    print(
        f"error: could not connect to every process through {where} within --init_timeout {seconds}s; is every "
        "process started, with the same address and --num_processes, and can it reach process 0's host?",
        file=sys.stderr,
        flush=True,
    )
    os._exit(2)


def is_main_process() -> bool:
    """Process 0 prints, writes the run and metrics files and appends results; every process computes."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works on every process when arrays have shards on other processes."""
    if all(_local(leaf) for leaf in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    return jax.tree.map(lambda x: x if _local(x) else multihost_utils.process_allgather(x, tiled=True), tree)


def _local(x: Any) -> bool:
    """Whether this process can read all of ``x`` by itself."""
    return not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated


def exit_process(code: int, why: str) -> None:
    """Exits; a connected process first tells its peers (their watchdogs end them) and leaves without
    JAX's exit barrier, which peers stuck in their next collective would never reach."""
    if not jax.distributed.is_initialized():
        sys.exit(code)
    if not _watchdog.started:  # connecting failed: leave before the half-made client's shutdown waits
        sys.stderr.flush()
        os._exit(code)
    _watchdog.leaving.set()
    with contextlib.suppress(Exception):  # the coordinator may be gone already
        _client().key_value_set(f"{FAILED_KEY}{jax.process_index()}", why)
    _leave(code)


def _leave(code: int) -> None:
    """Exits now; process 0 first gives its peers time to read the failure, as it hosts the coordination
    service (a peer that loses it before reading would abort with a C++ stack trace)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.process_index() == 0:
        time.sleep(3 * POLL_SECONDS)
    os._exit(code)


class _Watchdog:
    """Polls the coordination service for a failed peer; ends this process with one ``error:`` line.

    Without it a process whose peer stopped would wait in its next collective until the missing
    heartbeats (``--heartbeat_timeout``) make XLA abort it with a C++ stack trace.
    """

    def __init__(self) -> None:
        self.leaving = threading.Event()  # this process is exiting by itself: stay quiet
        self.started = False

    def start(self) -> None:
        self.started = True
        atexit.register(self.leaving.set)  # runs before JAX's own exit handler (last registered, first run)
        threading.Thread(target=self._watch, name="jaxgpt-peer-watchdog", daemon=True).start()

    def _watch(self) -> None:
        client = _client()
        while not self.leaving.wait(POLL_SECONDS):
            try:
                failed = client.key_value_dir_get(FAILED_KEY)
            except Exception as err:
                failed = [("", f"lost the coordinator, process 0 ({_first_line(err)})")]
            if failed and not self.leaving.is_set():
                key, why = failed[0]
                who = f"process {key.rsplit('/', 1)[-1]}" if key else "the run"
                print(f"error: {who} stopped ({why}); see its output. Stopping this process too.",
                      file=sys.stderr, flush=True)  # fmt: skip
                _leave(PEER_FAILURE_EXIT_CODE)


_watchdog = _Watchdog()


def _client() -> Any:
    return jax_distributed.global_state.client


def _first_line(message: Any) -> str:
    lines = str(message).strip().splitlines()
    return lines[0] if lines else type(message).__name__
