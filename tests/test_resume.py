"""Resuming: a stopped run continues with the same batches, learning rates and parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxgpt.checkpoints.checkpointer import Checkpointer
from jaxgpt.checkpoints.loading import load_model_from_checkpoint
from jaxgpt.model.params import ParamCodec
from tests.train_utils import ROOT, logged_losses, run_train_cli, train_args, write_token_data

STEPS = ["--max_steps", "8", "--lr_decay_steps", "8", "--dropout", "0.1"]  # dropout: the RNG must resume too


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_token_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_train_cli(train_args(data_dir, out, *STEPS, "--save_interval", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def final_params(out_dir):
    model = load_model_from_checkpoint(out_dir)
    return {k: np.asarray(v) for k, v in ParamCodec(model.config).to_flat(model).items()}


def assert_same_run(out_dir, straight_dir):
    assert logged_losses(out_dir) == logged_losses(straight_dir)  # bit-identical, every step
    expected = final_params(straight_dir)
    for name, value in final_params(out_dir).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_stop_and_resume_equals_straight_run(data_dir, straight, tmp_path):
    out = tmp_path / "out"
    first = run_train_cli(train_args(data_dir, out, "--max_steps", "4", "--lr_decay_steps", "8", "--dropout", "0.1"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert Checkpointer(out, async_save=False).latest_step() == 4
    second = run_train_cli(train_args(data_dir, out, *STEPS, "--resume", "--save_interval", "4"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 4" in second.stdout
    assert_same_run(out, straight)


def test_sigkill_during_training_resumes_from_last_complete_checkpoint(data_dir, straight, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, str(ROOT / "train.py"), *train_args(data_dir, out, *STEPS, "--save_interval", "1")]
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    checkpoints = out / "checkpoints"
    while time.time() < deadline and process.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 3 for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed; slow it down"
    process.send_signal(signal.SIGKILL)  # possibly in the middle of writing step 4's checkpoint
    process.wait()
    killed_at = Checkpointer(out, async_save=False).latest_step()
    assert killed_at is not None and killed_at < 8
    resumed = run_train_cli(train_args(data_dir, out, *STEPS, "--save_interval", "1"))  # same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {killed_at}" in resumed.stdout
    assert_same_run(out, straight)
