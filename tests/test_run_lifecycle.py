"""What a user meets around a run: the end-of-run summary, a finished run re-run, --fresh, failed starts
leaving nothing behind, abbreviated flags, a typed --max_steps against a preset's epochs."""

from __future__ import annotations

import json
import os

import pytest

from jaxgpt.checkpoints.loading import load_model, newest_run
from jaxgpt.core.errors import UserError
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import train
from tests.train_utils import logged_losses, train_args, write_token_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_token_data(tmp_path_factory.mktemp("data"))


def test_a_finished_run_says_so_then_continues_or_starts_fresh(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_run_config(train_args(data_dir, out)))
    printed = capsys.readouterr().out
    assert "done: 6 steps, 768 tokens in " in printed  # 6 steps of 8 x 16 tokens
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]["val_loss"]
    assert f"val loss: final {final:.4f}, best {final:.4f} at step 6" in printed
    assert f"checkpoint: {out}/checkpoints/6" in printed
    for command in ("python sample.py --init_from", "--chat", "python -m jaxgpt.serve --init_from"):
        assert f"{command}" in printed and str(out) in printed

    with pytest.raises(UserError, match=r"is complete \(6 of --max_steps 6 steps done\).*--max_steps.*--fresh"):
        train(parse_run_config(train_args(data_dir, out)))
    record = train(parse_run_config(train_args(data_dir, out, "--max_steps", "8")))
    assert record["step"] == 8 and sorted(logged_losses(out)) == list(range(1, 9))
    assert "done: 2 steps, 256 tokens" in capsys.readouterr().out  # what this session trained

    train(parse_run_config(train_args(data_dir, out, "--fresh")))
    assert sorted(logged_losses(out)) == list(range(1, 7))  # started over: steps 7 and 8 are gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["6"]


@pytest.mark.parametrize("extra", [["--mesh", "3x1"], ["--data_dir", "/nonexistent/data"]])
def test_a_run_that_fails_to_start_leaves_no_folder(data_dir, tmp_path, extra):
    out = tmp_path / "new" / "run"
    with pytest.raises(UserError):
        train(parse_run_config(train_args(data_dir, out, *extra)))
    assert not out.exists()
    out.mkdir(parents=True)  # a folder that was there before stays
    with pytest.raises(UserError):
        train(parse_run_config(train_args(data_dir, out, *extra)))
    assert out.is_dir()


def test_abbreviated_flags_are_refused():
    with pytest.raises(UserError, match="unrecognized arguments: --max 10"):
        parse_run_config(["--max", "10"])


def test_a_typed_max_steps_beats_the_epochs_a_preset_derives():
    cfg = parse_run_config(["--preset", "sft", "--max_steps", "600"]).train_config
    assert cfg.max_steps == 600 and cfg.epochs is None
    assert parse_run_config(["--preset", "sft"]).train_config.epochs == 3.0
    with pytest.raises(UserError, match="--max_steps and --epochs"):
        parse_run_config(["--preset", "sft", "--max_steps", "600", "--epochs", "2"])
    with pytest.raises(UserError, match=r"--fresh .* --resume"):
        parse_run_config(["--fresh", "--resume"])


def test_a_missing_run_directory_is_named_without_asking_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for missing in ("out/nothere", str(tmp_path / "nothere"), "./nothere"):
        with pytest.raises(UserError, match="no such run directory"):
            load_model(missing)


def test_newest_run_is_the_one_written_last(tmp_path):
    with pytest.raises(UserError, match="no training run with checkpoints under"):
        newest_run(tmp_path)
    for i, name in enumerate(["b", "a", "c"]):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "jaxgpt.json").write_text("{}")
        os.utime(tmp_path / name / "jaxgpt.json", (1000 + i, 1000 + [1, 3, 2][i]))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "jaxgpt.json").write_text("{}")  # no checkpoints: a run that never saved
    assert newest_run(tmp_path) == tmp_path / "a"
