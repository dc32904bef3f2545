"""Run tracking and profiling: TensorBoard events and an offline W&B run hold what metrics.jsonl holds."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest

from jaxgpt.checkpoints.run_dir import MetricsWriter, read_metrics, read_run_file, write_run_file
from jaxgpt.core.errors import UserError
from jaxgpt.model.config import GPTConfig
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import train
from jaxgpt.train.profiling import PROFILE_DIR, parse_profile_steps
from jaxgpt.train.tracking import TENSORBOARD_DIR, WANDB_RUN_ID, open_trackers
from tests.train_utils import train_args, write_token_data

CONFIGS = {"model": {"n_layer": 2}, "train": {"lr": 0.01}}


def records(steps: range, offset: float = 0.0) -> list[dict]:
    """Training-like records: every step a loss and a learning rate, every other one a validation loss."""
    out = []
    for step in steps:
        record = {"loss": 5.0 / step + offset, "lr": 1e-3 * step, "mfu": None, "step": step}
        if step % 2 == 0:
            record["val_loss"] = 6.0 / step + offset
            record["val_bpb"] = 3.0 / step + offset
        out.append(record)
    return out


def log_run(out_dir: Path, logged: list[dict], start_step: int = 0, **flags) -> None:
    """What the trainer does: metrics.jsonl (truncated on resume) and the trackers get the same records."""
    writer = MetricsWriter(out_dir)
    writer.truncate_after(start_step)
    trackers = open_trackers(out_dir, configs=CONFIGS, start_step=start_step, **flags)
    for record in logged:
        writer.write(record)
        trackers.log(record)
    trackers.log_text(logged[-1]["step"], "sample", "ROMEO:\nHello there")
    trackers.close()


def tensorboard_scalars(out_dir: Path) -> dict[str, dict[int, float]]:
    """TensorBoard's own reader (it applies purges): tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tensorboard_texts(out_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / TENSORBOARD_DIR), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]
    }


def metrics_by_tag(out_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tag -> step -> value (None values are not logged)."""
    by_tag: dict[str, dict[int, float]] = {}
    for record in read_metrics(out_dir):
        for key, value in record.items():
            if key != "step" and value is not None:
                by_tag.setdefault(key, {})[record["step"]] = value
    return by_tag


def assert_same(scalars: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    assert scalars.keys() == expected.keys()
    for tag, values in expected.items():
        assert scalars[tag] == pytest.approx(values, rel=1e-6), tag  # TensorBoard stores float32


def test_tensorboard_events_equal_metrics_jsonl(tmp_path):
    log_run(tmp_path, records(range(1, 7)), tensorboard=True, wandb_project=None)
    assert_same(tensorboard_scalars(tmp_path), metrics_by_tag(tmp_path))
    assert set(metrics_by_tag(tmp_path)) == {"loss", "lr", "val_loss", "val_bpb"}
    texts = tensorboard_texts(tmp_path)
    assert "ROMEO:\nHello there" in texts["sample/text_summary"][0]
    assert '"lr": 0.01' in texts["config/text_summary"][0]


def test_a_resumed_run_continues_the_same_tensorboard_curves(tmp_path):
    log_run(tmp_path, records(range(1, 7)), tensorboard=True, wandb_project=None)  # crashed after step 6...
    log_run(tmp_path, records(range(4, 9), offset=1.0), start_step=3, tensorboard=True, wandb_project=None)
    scalars = tensorboard_scalars(tmp_path)  # ...resumed from the checkpoint of step 3
    assert_same(scalars, metrics_by_tag(tmp_path))
    assert sorted(scalars["loss"]) == list(range(1, 9))
    assert scalars["loss"][5] == pytest.approx(5.0 / 5 + 1.0)  # the second run's value, not the first's


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` (LevelDB log format: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_history(run_dir: Path) -> dict[str, dict[int, float]]:
    by_tag: dict[str, dict[int, float]] = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key, value = item.key or "/".join(item.nested_key), json.loads(item.value_json)
                if not key.startswith("_"):
                    by_tag.setdefault(key, {})[record.history.step.num] = value
    return by_tag


def test_wandb_offline_run_holds_the_metrics_and_resumes_by_the_stored_id(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_run_file(tmp_path, GPTConfig(n_layer=2))
    log_run(tmp_path, records(range(1, 5)), tensorboard=False, wandb_project="jaxgpt-test")
    wandb.teardown()  # stops W&B's service process: the run file is complete once it has gone
    run_id = read_run_file(tmp_path)[WANDB_RUN_ID]
    (first,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    history = wandb_history(first)
    sample = first / "files" / history.pop("sample/path")[4]
    assert {k: v for k, v in history.items() if not k.startswith("sample/")} == metrics_by_tag(tmp_path)
    assert "ROMEO:\nHello there" in sample.read_text()
    run = next(r.run for r in wandb_records(first) if r.WhichOneof("record_type") == "run")
    assert {item.key: json.loads(item.value_json) for item in run.config.update}["train"] == CONFIGS["train"]

    log_run(tmp_path, records(range(5, 7)), start_step=4, tensorboard=False, wandb_project="jaxgpt-test")
    wandb.teardown()
    assert read_run_file(tmp_path)[WANDB_RUN_ID] == run_id  # the same W&B run, resumed
    (second,) = set((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")) - {first}
    assert sorted(wandb_history(second)["loss"]) == [5, 6]


def test_training_logs_tensorboard_and_writes_a_profile(tmp_path):
    data_dir = write_token_data(tmp_path / "data")
    out_dir = tmp_path / "out"
    sampled = ["--vocab_size", "50257", "--sample_tokens", "4", "--sample_interval", "0"]  # a sample at the end
    args = train_args(data_dir, out_dir, *sampled)
    train(parse_run_config([*args, "--tensorboard", "--profile_steps", "2:4"]))  # log every step, evaluate at the end
    assert_same(tensorboard_scalars(out_dir), metrics_by_tag(out_dir))
    assert {"loss", "val_loss", "lr", "grad_norm"} <= set(metrics_by_tag(out_dir))
    assert len(tensorboard_texts(out_dir)["sample/text_summary"]) == 1  # the sample at the last step
    traces = list((out_dir / PROFILE_DIR).rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    (perfetto,) = (out_dir / PROFILE_DIR).rglob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
    annotated = {event["args"]["step_num"] for event in events if "step_num" in event.get("args", {})}
    assert annotated == {"2", "3"}  # one StepTraceAnnotation per traced step


@pytest.mark.parametrize("spec", ["10", "5:5", "a:b", "-1:3", "4:2"])
def test_bad_profile_steps_are_user_errors(spec):
    with pytest.raises(UserError, match="START:STOP"):
        parse_profile_steps(spec)
    assert parse_profile_steps("10:15") == range(10, 15)


def test_a_missing_tracker_package_is_a_user_error_before_training(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(UserError, match="wandb is not installed: pip install -r requirements-tracking"):
        parse_run_config(["--out_dir", str(tmp_path), "--wandb_project", "p"])
    parse_run_config(["--out_dir", str(tmp_path), "--tensorboard"])  # tensorboardX is there
