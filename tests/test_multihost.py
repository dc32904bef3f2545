"""Multi-process runs: 2 processes x 4 CPU devices (gloo collectives, a free local port) against 1 x 8.

Each run is a real ``train.py`` / ``python -m jaxgpt.eval`` command; runs are shared across the
assertions because process start-up and compilation dominate. Losses may differ from one process's
by float32 rounding only (the reduction order of a gradient's mean changes with the mesh).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jaxgpt.checkpoints.run_dir import METRICS_FILE, read_metrics
from jaxgpt.core.distributed import LaunchConfig
from jaxgpt.core.errors import UserError
from tests.train_utils import ROOT, TINY_MODEL, write_token_data

VOCAB = 50304  # GPT-2's, padded: samples start from <|endoftext|> (the token data stays below 256)
STEPS, RESUMED_STEPS = 6, 9
TIMEOUT = 300
TRAIN = [
    "--preset", "shakespeare-gpt2",
    *TINY_MODEL, "--vocab_size", str(VOCAB), "--batch_size", "8", "--log_interval", "1", "--eval_interval", "0",
    "--eval_iters", "2", "--warmup_steps", "2", "--lr", "1e-2", "--lr_decay_steps", str(RESUMED_STEPS),
    "--sample_tokens", "8", "--save_interval", "100",
]  # fmt: skip
HELLASWAG = [  # (context, endings, label)
    ("The cat sat on the", ["mat.", "moon.", "idea.", "sky."], 0),
    ("A boy rides his", ["bike down the hill.", "cloud.", "spoon into the sea.", "dream."], 0),
    ("She drinks a cup of", ["rock.", "shoe.", "chair.", "tea."], 3),
]


def hellaswag_file(path: Path) -> Path:
    records = [
        {"ind": i, "activity_label": "x", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "split": "val",
         "split_type": "indomain", "label": label, "endings": endings, "source_id": f"t~{i}"}
        for i, (ctx, endings, label) in enumerate(HELLASWAG)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(
    command: list[str], args: list[str], processes: int = 2, per_process: dict[int, list[str]] | None = None
) -> list[subprocess.CompletedProcess]:
    """Runs ``command args`` as ``processes`` processes with 8 CPU devices among them; waits for all."""
    devices = f"--xla_force_host_platform_device_count={8 // processes}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": devices}
    launch_flags = ["--coordinator_address", f"localhost:{free_port()}", "--num_processes", str(processes),
                    "--init_timeout", "60", "--heartbeat_timeout", "10"]  # fmt: skip
    with contextlib.ExitStack() as stack:
        procs, logs = [], []
        for i in range(processes):
            flags = [*launch_flags, "--process_id", str(i)] if processes > 1 else []
            out, err = (stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            cmd = [sys.executable, *command, *args, *flags, *(per_process or {}).get(i, [])]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True))
            stack.callback(procs[-1].kill)  # never leave a process behind (a no-op once it has exited)
            logs.append((out, err))
        deadline = time.monotonic() + TIMEOUT
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
        texts = [[f.seek(0) or f.read() for f in pair] for pair in logs]
    return [subprocess.CompletedProcess(p.args, c, o, e) for p, c, (o, e) in zip(procs, codes, texts, strict=True)]


def train(out_dir: Path, data_dir: Path, *extra: str, processes: int = 2, **kw) -> list[subprocess.CompletedProcess]:
    args = ["--data_dir", str(data_dir), "--out_dir", str(out_dir), *TRAIN, *extra]
    results = launch([str(ROOT / "train.py")], args, processes, **kw)
    return results


def assert_ok(results: list[subprocess.CompletedProcess]) -> None:
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def by_step(out_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out_dir) if key in r}


def assert_close(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps), got
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, got[step], want[step])


def sample_of(stdout: str) -> str:
    return re.search(r"--- sample at step \d+ ---\n(.*?)\n---", stdout, re.S).group(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """One process x 8 devices and two x 4 (8x1), the same 6 steps with evaluation, a sample and HellaSwag."""
    tmp = tmp_path_factory.mktemp("multihost")
    hellaswag = hellaswag_file(tmp / "hellaswag.jsonl")
    extra = ["--max_steps", str(STEPS), "--mesh", "8x1", "--hellaswag_interval", str(STEPS),
             "--hellaswag_path", str(hellaswag)]  # fmt: skip
    start = time.perf_counter()
    single = train(tmp / "single", data, *extra, processes=1)
    double = train(tmp / "double", data, *extra)
    assert_ok(single)
    assert_ok(double)
    print(f"two training runs: {time.perf_counter() - start:.1f}s")
    return tmp, data, hellaswag, single, double


def test_two_processes_train_as_one(runs):
    tmp, _, _, single, double = runs
    one, two = tmp / "single", tmp / "double"
    assert_close(by_step(two, "loss"), by_step(one, "loss"), range(1, STEPS + 1))
    assert_close(by_step(two, "val_loss"), by_step(one, "val_loss"), range(STEPS, STEPS + 1))
    for key in ("acc", "acc_norm"):
        assert by_step(two, key) == by_step(one, key)
    assert (two / "checkpoints" / str(STEPS)).is_dir() and (two / "jaxgpt.json").is_file()
    # Process 0 alone prints (the same sample as one process) and writes the metrics: one line per step.
    assert sample_of(double[0].stdout) == sample_of(single[0].stdout)
    assert "sample at step" not in double[1].stdout and "step      1/6" not in double[1].stdout
    assert len((two / METRICS_FILE).read_text().splitlines()) == STEPS


def test_checkpoints_resume_across_process_counts(runs):
    """2 processes -> 1 (8x1) and 1 -> 2 (4x2, FSDP) continue to the same losses, 3 more steps."""
    tmp, data, *_ = runs
    shutil.copytree(tmp / "double", tmp / "to_one")
    shutil.copytree(tmp / "single", tmp / "to_two")
    more = ["--max_steps", str(RESUMED_STEPS)]
    assert_ok(train(tmp / "to_one", data, *more, "--mesh", "8x1", processes=1))
    assert_ok(train(tmp / "to_two", data, *more, "--mesh", "4x2", "--fsdp"))
    steps = range(1, RESUMED_STEPS + 1)
    assert_close(by_step(tmp / "to_two", "loss"), by_step(tmp / "to_one", "loss"), steps)
    assert_close(by_step(tmp / "to_two", "val_loss"), by_step(tmp / "to_one", "val_loss"), range(STEPS, 10, 3))
    assert by_step(tmp / "to_one", "loss")[STEPS + 1] != by_step(tmp / "to_one", "loss")[STEPS]  # it trained on


def test_eval_across_processes_matches_training(runs):
    """``python -m jaxgpt.eval`` on a 4x2 mesh over 2 processes: training's figures, one report."""
    tmp, data, hellaswag, *_ = runs
    results = tmp / "evals.jsonl"
    args = ["--init_from", str(tmp / "double"), "--val_data", str(data), "--max_tokens", str(2 * 8 * 16),
            "--hellaswag", str(hellaswag), "--mesh", "4x2", "--results", str(results)]  # fmt: skip
    evals = launch(["-m", "jaxgpt.eval"], args)
    assert_ok(evals)
    (record,) = map(json.loads, results.read_text().splitlines())  # process 0 alone appends
    assert record["val_loss"] == pytest.approx(by_step(tmp / "single", "val_loss")[STEPS], abs=1e-5)
    assert record["acc_norm"] == by_step(tmp / "single", "acc_norm")[STEPS]
    assert "val_loss" in evals[0].stdout and "val_loss" not in evals[1].stdout


def test_a_process_failing_at_start_up_ends_both(data, tmp_path):
    """Process 1 cannot read its data after connecting: both exit with one error line, without hanging."""
    start = time.perf_counter()
    failed = train(tmp_path / "out", data, "--max_steps", "2", per_process={1: ["--data_dir", str(tmp_path / "none")]})
    elapsed = time.perf_counter() - start
    assert [r.returncode for r in failed] == [3, 2], [r.stderr[-2000:] for r in failed]
    assert "error: process 1 stopped (" in failed[0].stderr and "Traceback" not in failed[0].stderr
    assert failed[1].stderr.strip().splitlines()[-1].startswith("error: ")
    assert elapsed < 120, elapsed


def test_a_missing_peer_is_an_error_after_the_init_timeout(tmp_path):
    port = free_port()
    args = ["--coordinator_address", f"localhost:{port}", "--num_processes", "2", "--process_id", "0",
            "--init_timeout", "3", "--out_dir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: could not connect to every process"), r.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(num_processes=2), "need --coordinator_address"),
        (dict(coordinator_address="host", num_processes=2, process_id=0), "HOST:PORT"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id < --num_processes"),
        (dict(coordinator_address="h:1", num_processes=2), "needs --process_id"),
        (dict(distributed=True, local_device_ids="0,a"), "comma-separated integers"),
    ],
)
def test_launch_flags_are_checked_before_connecting(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        LaunchConfig(**flags)
