"""Faults and bad input (issue 12): each case ends in one `error:` line (exit 2) or its documented
recovery, and never changes a byte of an earlier good checkpoint or dataset.

One small run is trained (as a subprocess) once; the tests copy it. CLI cases go through
``cli.run`` in-process (the real entry point's code, without a new interpreter) unless the case
is about processes (locks) or the environment.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import sample
from jaxgpt.checkpoints.checkpointer import Checkpointer, SaveFailedError
from jaxgpt.checkpoints.loading import load_model_from_checkpoint, save_model
from jaxgpt.checkpoints.run_dir import LOCK_FILE, METRICS_FILE, RUN_FILE, RunLock, read_metrics
from jaxgpt.convert import save_hf_gpt2
from jaxgpt.convert.__main__ import main as convert_main
from jaxgpt.core import cli
from jaxgpt.core.errors import UserError
from jaxgpt.data import shards
from jaxgpt.data.meta import META, check_dataset
from jaxgpt.data.prepare import PrepareConfig, prepare
from jaxgpt.data.prepare import main as prepare_main
from jaxgpt.eval.__main__ import main as eval_main
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.plot import main as plot_main
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import train
from tests.train_utils import ROOT, VOCAB, run_train_cli, train_args, write_token_data

TINY = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16)


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(capsys, main, argv) -> str:
    """Runs an entry point as its ``__main__`` does; asserts exit 2 and a single ``error:`` line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("data"), train_tokens=4_000, val_tokens=400)


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2 and 3, trained by train.py with its output going to files."""
    out = tmp_path_factory.mktemp("run") / "run"
    args = train_args(
        data_dir, out, "--max_steps", "3", "--save_interval", "2", "--n_layer", "1", "--sample_tokens", "0"
    )
    done = run_train_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stdout + done.stderr  # no progress bar when the output is not a terminal
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]
    return out


def copy_run(good_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def run_flags(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """In-process runs: a checkpoint every step, no samples."""
    return train_args(data_dir, out, "--n_layer", "1", "--save_interval", "1", "--sample_tokens", "0", *extra)


# --- data lost or silently wrong ---------------------------------------------------------------


def test_convert_never_overwrites_a_run_unless_asked(good_run, tmp_path, capsys):
    run = copy_run(good_run, tmp_path)
    before = tree_bytes(run)
    line = one_error_line(capsys, convert_main, ["--src", str(run), "--dst", str(run), "--format", "jaxgpt"])
    assert "--overwrite" in line and "training run" in line
    assert tree_bytes(run) == before
    convert_main(["--src", str(run), "--dst", str(run), "--format", "jaxgpt", "--overwrite"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0"]
    hf = tmp_path / "hf"
    convert_main(["--src", str(run), "--dst", str(hf)])
    umask = os.umask(0o022)
    os.umask(umask)
    assert (hf / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600


def test_a_run_directory_is_locked(tmp_path, capsys):
    with (
        RunLock(tmp_path),
        pytest.raises(UserError, match=rf"in use .*\(pid {os.getpid()}\)"),
    ):
        RunLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_FILE).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(tmp_path):  # a stale lock is taken over, with a message
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"its process ({dead.pid}) is no longer running" in capsys.readouterr().err
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(UserError, match="on host another-host"):
        RunLock(tmp_path).__enter__()


def test_a_second_train_process_on_a_locked_run_stops_at_once(data_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.joinpath(LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        done = run_train_cli(run_flags(data_dir, tmp_path))
    finally:
        holder.kill()
        holder.wait()
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0], done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing written, no checkpoints/


def test_training_refuses_a_dataset_that_disagrees_with_its_meta(data_dir, tmp_path):
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    check_dataset(data, VOCAB)
    meta = json.loads((data / META).read_text())
    (data / "test_train_000000.bin").rename(data / "moved.bin")  # half a dataset: a listed shard is gone
    with pytest.raises(UserError, match="1 listed shards missing"):
        check_dataset(data, VOCAB)
    (data / "moved.bin").rename(data / "test_train_000000.bin")
    shards.write_shard(data / "test_train_000001.bin", np.arange(50, dtype=np.uint16))  # an unlisted one
    with pytest.raises(UserError, match="1 unlisted shards"):
        check_dataset(data, VOCAB)
    (data / "test_train_000001.bin").unlink()
    (data / META).unlink()  # what a run killed before the rename used to leave
    with pytest.raises(UserError, match=r"no meta\.json"):
        train(parse_run_config(run_flags(data, tmp_path / "out")))
    assert not (tmp_path / "out" / "checkpoints").exists()  # a failed run leaves no empty checkpoints/
    meta["shards"][0]["tokens"] += 1
    (data / META).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not hold the 4001 tokens"):
        check_dataset(data, VOCAB)


def test_prepare_replaces_a_dataset_whole_or_not_at_all(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    out = tmp_path / "data"
    prepare(PrepareConfig(input=str(corpus), out_dir=str(out), shard_size=500, num_proc=1))
    (out / "notes.txt").write_text("kept")  # a file beside the dataset comes along
    before = tree_bytes(out)
    replace_calls = []
    monkeypatch.setattr("jaxgpt.data.prepare.replace_dir", lambda *a: replace_calls.append(a) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # dies at the very last moment
        prepare(PrepareConfig(input=str(corpus), out_dir=str(out), shard_size=300, num_proc=1))
    assert tree_bytes(out) == before and len(replace_calls) == 1
    monkeypatch.undo()
    meta = prepare(PrepareConfig(input=str(corpus), out_dir=str(out), shard_size=300, num_proc=1))
    assert (out / "notes.txt").read_text() == "kept" and check_dataset(out, 50257) == meta
    assert all(r["max_token_id"] == max(shards.open_shard(out / r["file"])) for r in meta["shards"])


def test_corrupt_checkpoints_fall_back_to_the_newest_intact_step(good_run, data_dir, tmp_path, capsys):
    run = copy_run(good_run, tmp_path)
    step2 = load_model_from_checkpoint(run, step=2)
    intact = tree_bytes(run / "checkpoints" / "2")
    data_files = sorted((run / "checkpoints" / "3" / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    damaged = bytearray(data_files[-1].read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 16] = b"\xff" * 16  # bytes overwritten in place
    data_files[-1].write_bytes(bytes(damaged))
    model = load_model_from_checkpoint(run)  # sampling/eval: falls back, leaves the bad step in place
    assert "checkpoint step 3" in capsys.readouterr().err
    np.testing.assert_array_equal(model.wte.embedding[...], step2.wte.embedding[...])
    flags = [a for a in run_flags(data_dir, run, "--max_steps", "3") if a not in ("--batch_size", "8")]
    record = train(parse_run_config(flags))  # without --batch_size: the run's 8 (the preset's is 12)
    assert record["step"] == 3 and (run / "corrupt-checkpoints" / "3").is_dir()
    assert "moved it to" in capsys.readouterr().err
    assert json.loads((run / RUN_FILE).read_text())["train"]["batch_size"] == 8
    assert tree_bytes(run / "checkpoints" / "2") == intact


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_unreadable_checkpoint_steps_are_named_and_skipped(good_run, tmp_path, capsys, damage):
    run = copy_run(good_run, tmp_path)
    step = run / "checkpoints" / "3"
    target = max((step / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    else:
        (step / "params" / "_METADATA").write_text("{garbage")
    load_model_from_checkpoint(run)
    assert "checkpoint step 3" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"checkpoint step 3 .* is corrupt"):
        load_model_from_checkpoint(run, step=3)


def test_a_failed_background_save_stops_the_run(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, saves = ocp.StandardCheckpointHandler.async_save, []

    class DiskFull:
        def result(self, timeout=None):
            raise OSError(errno.ENOSPC, "No space left on device")

    async def failing_save(self, *args, **kwargs):
        futures = await real_save(self, *args, **kwargs)
        saves.append(1)
        return [*(futures or []), *([DiskFull()] if len(saves) > 2 else [])]  # 2 items a step: step 2 fails

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_save)
    with pytest.raises(SaveFailedError, match=r"step 2 .*No space left on device.*step 1 is the last intact"):
        train(parse_run_config(run_flags(data_dir, out, "--max_steps", "6")))
    steps = [r["step"] for r in read_metrics(out)]
    assert max(steps) <= 4  # stopped at once, not at the end of the run
    checkpointer = Checkpointer(out, read_only=True)
    assert checkpointer.all_steps() == [1]
    checkpointer.close()
    load_model_from_checkpoint(out)  # the last good checkpoint is intact


def test_every_input_is_checked_before_the_first_step(data_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="0 tokens"):
        prepare(PrepareConfig(input=str(tmp_path / "empty.txt"), out_dir=str(tmp_path / "e"), num_proc=1))
    assert not (tmp_path / "e").exists()
    with pytest.raises(UserError, match="--warmup_steps must be >= 0"):
        parse_run_config(["--warmup_steps", "-5"])

    def run_on(data: Path, *extra: str) -> str:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        with pytest.raises(UserError) as error:
            train(parse_run_config(run_flags(data, out, *extra)))
        assert not (out / METRICS_FILE).exists() and not (out / "checkpoints").exists()  # no step ran
        return str(error.value)

    no_val = Path(shutil.copytree(data_dir, tmp_path / "no_val"))  # as --val_fraction 0 writes it
    (no_val / "test_val_000000.bin").unlink()
    meta = json.loads((no_val / META).read_text())
    meta["shards"] = [r for r in meta["shards"] if r["split"] == "train"]
    (no_val / META).write_text(json.dumps(meta))
    assert "no 'val' tokens; prepare it with a --val_fraction above 0" in run_on(no_val)
    bad_val = Path(shutil.copytree(data_dir, tmp_path / "bad_val"))
    (bad_val / "test_val_000000.bin").write_bytes(b"\0" * 100)
    assert "test_val_000000.bin" in run_on(bad_val)
    assert "token ids up to 255 but the model's vocab_size is 100; use --vocab_size 256" in run_on(
        data_dir, "--vocab_size", "100"
    )


# --- tracebacks that are now one error line ------------------------------------------------------


def test_damaged_files_are_one_error_line(good_run, data_dir, tmp_path, capsys):
    hf = tmp_path / "hf"
    save_hf_gpt2(GPT(TINY, nnx.Rngs(0)), hf)
    weights = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "model.safetensors is damaged or truncated" in one_error_line(capsys, sample.main, ["--init_from", str(hf)])
    (hf / "config.json").write_text('{"n_embd": 16,')
    assert "config.json is not valid JSON" in one_error_line(capsys, convert_main, ["--src", str(hf), "--dst", "x"])
    (hf / "config.json").write_text('{"n_embd": 16}')
    assert "lacks integer vocab_size" in one_error_line(
        capsys, eval_main, ["--init_from", str(hf), "--val_data", str(data_dir)]
    )

    run = copy_run(good_run, tmp_path)
    (run / RUN_FILE).write_text('{"format": 1, "model": {')
    assert "jaxgpt.json is damaged" in one_error_line(capsys, sample.main, ["--init_from", str(run)])
    assert "is a file" in one_error_line(
        capsys, lambda a: train(parse_run_config(a)), ["--out_dir", str(hf / "config.json")]
    )

    nan_run = tmp_path / "nan"
    model = GPT(TINY, nnx.Rngs(0))
    model.h[0].mlp.c_fc.kernel[...] = jnp.full_like(model.h[0].mlp.c_fc.kernel[...], jnp.nan)
    save_model(model, nan_run)
    assert "hold NaN or Inf (first: h.0.mlp.c_fc.kernel)" in one_error_line(
        capsys, sample.main, ["--init_from", str(nan_run)]
    )


def test_a_cut_off_metrics_line_does_not_stop_resume_or_plot(good_run, tmp_path, capsys):
    run = copy_run(good_run, tmp_path)
    text = (run / METRICS_FILE).read_text()
    (run / METRICS_FILE).write_text(text + '{"step": 4, "lo')  # the process died mid-write
    assert [r["step"] for r in read_metrics(run)] == [json.loads(x)["step"] for x in text.splitlines()]
    plot_main([str(run)])
    assert (run / "curves.png").is_file() and "cut-off last line" in capsys.readouterr().err
    (run / METRICS_FILE).write_text('{"step": 1, "lo\n' + text)
    assert f"{METRICS_FILE}:1 is not a JSON record" in one_error_line(capsys, plot_main, [str(run)])


def test_resume_with_another_batch_size_says_which_flag(good_run, data_dir, tmp_path):
    run = copy_run(good_run, tmp_path)
    flags = run_flags(data_dir, run, "--max_steps", "4", "--batch_size", "16")
    with pytest.raises(UserError, match=r"trained with --batch_size 8; drop --batch_size 16 .* or add --reset_data"):
        train(parse_run_config(flags))
    # (that a resume without --batch_size takes the run's: test_corrupt_checkpoints_fall_back_...)


# --- messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "main",
    [lambda a: parse_run_config(a), sample.main, eval_main, convert_main, prepare_main],
    ids=["train", "sample", "eval", "convert", "prepare"],
)
def test_help_says_each_default_and_description_once(main, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert not re.search(r"\(default: [^)]*\)\s+\(default:", text)
    description = text.split("\n\n")[1].strip()  # the paragraph after the usage
    assert text.count(description) == 1, f"printed twice: {description}"
    assert "prepare.py" not in text
    if main is sample.main:
        assert "--top_k INT|none" in text


def test_readme_sample_commands_fit_the_default_model():
    readme = (ROOT / "README.md").read_text()
    block_size = parse_run_config([]).model_config.block_size
    commands = [line for line in readme.splitlines() if "sample.py --init_from out/shakespeare" in line]
    assert commands
    for command in commands:  # without --max_new_tokens, sample.py takes what fits the context
        words = command.split()
        if "--max_new_tokens" in words:
            assert int(words[words.index("--max_new_tokens") + 1]) < block_size, command
    assert "export TIKTOKEN_CACHE_DIR" not in readme.split("## Quick start")[1].split("```")[1]


def test_tokenizer_finds_the_shared_data_without_the_variable():
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    code = "import os, jaxgpt.tokenizer as t; t.load_tokenizer(); print(os.environ['TIKTOKEN_CACHE_DIR'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == (ROOT.parent / "shared" / "data" / "tiktoken").resolve()


def test_fingerprint_catches_any_single_changed_element():
    from jaxgpt.checkpoints.fingerprint import fingerprints

    x = jax.random.normal(jax.random.key(0), (64, 8))
    base = fingerprints({"x": x})
    for index in [(0, 0), (31, 5), (63, 7)]:
        assert fingerprints({"x": x.at[index].set(jnp.nan)}) != base
        assert fingerprints({"x": x.at[index].set(jnp.nextafter(x[index], jnp.inf))}) != base  # one bit
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # the same values in other places
    assert fingerprints({"x": swapped}) != base
    assert fingerprints({"x": x.astype(jnp.bfloat16)}) != fingerprints({"x": x.astype(jnp.bfloat16).at[1, 1].set(0)})
