"""The run directory: the run file that marks a run, and the metrics file cut back on resume."""

from __future__ import annotations

import json

import pytest

from jaxgpt.checkpoints.run_dir import MetricsWriter, is_run_dir, read_metrics, read_run_file, write_run_file
from jaxgpt.core.errors import UserError
from jaxgpt.model.config import GPTConfig


def test_run_file_round_trips_and_marks_the_directory(tmp_path):
    assert not is_run_dir(tmp_path)
    with pytest.raises(UserError, match="not a jaxgpt run directory"):
        read_run_file(tmp_path)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    write_run_file(tmp_path / "run", config, {"lr": 0.1})
    run = read_run_file(tmp_path / "run")
    assert is_run_dir(tmp_path / "run") and GPTConfig.from_dict(run["model"]) == config and run["train"] == {"lr": 0.1}


def test_metrics_file_is_cut_back_on_resume(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write({"step": step, "loss": 1.0 / step, "mfu": None})
    writer.truncate_after(3)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["mfu"] is None
    assert read_metrics(tmp_path) == records
