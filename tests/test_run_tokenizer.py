"""A run with its own tokenizer: trained from prepared data, carried by the run, read by every command,
refused with data of another tokenizer, exported to Hugging Face; and its bits per byte, recomputed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_utils import run_train_cli

from jaxgpt.checkpoints.loading import load_model
from jaxgpt.data.prepare import PrepareConfig, prepare
from jaxgpt.data.shards import list_shards, open_shard
from jaxgpt.tokenizer import tokenizer_of
from jaxgpt.train.config import parse_run_config

REPO = Path(__file__).resolve().parents[1]
VOCAB = 320
# GPT-2's architecture (which Hugging Face exports), tiny; the vocabulary is the data's tokenizer's
TINY = ["--preset", "shakespeare-gpt2", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32"]
TINY += ["--batch_size", "8"]


@pytest.fixture(scope="module")
def corpus(shakespeare_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "bard.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "bard"
    prepare(PrepareConfig(input=str(corpus), out_dir=str(out), tokenizer=f"train:{VOCAB}", num_proc=1))
    return out


@pytest.fixture(scope="module")
def gpt2_data(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "bard-gpt2"
    prepare(PrepareConfig(input=str(corpus), out_dir=str(out), num_proc=1))
    return out


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> Path:
    from jaxgpt.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "bard"
    args = ["--data_dir", str(data), "--out_dir", str(out), *TINY, "--max_steps", "20", "--eval_interval", "10"]
    train(parse_run_config([*args, "--eval_iters", "2", "--log_interval", "5", "--sample_tokens", "8"]))
    return out


def test_the_run_takes_and_keeps_the_datas_tokenizer(data, run_dir):
    tokenizer = tokenizer_of(data)
    run = json.loads((run_dir / "jaxgpt.json").read_text())
    assert run["model"]["vocab_size"] == VOCAB  # the model's vocabulary is the tokenizer's, not GPT-2's
    assert run["tokenizer"]["fingerprint"] == tokenizer.fingerprint == tokenizer_of(run_dir).fingerprint
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "val_loss" in r]
    assert len(evaluated) == 2 and all(r["val_bpb"] > 0 for r in evaluated)


def test_val_bpb_is_the_nats_of_the_val_text_per_byte(data, corpus, run_dir):
    """Recomputed here: every val token scored by the model's forward pass, over the val text's UTF-8 bytes."""
    model = load_model(run_dir)
    tokens = np.concatenate([open_shard(p) for p in list_shards(data, "val")]).astype(np.int32)
    t, nats = model.config.block_size, 0.0
    for start in range(0, len(tokens) - 1, t):  # windows of t targets, as documented in jaxgpt.eval.loss
        window = tokens[start : start + t + 1]
        logits = np.asarray(model(window[None, :-1]), np.float64)[0, :, :VOCAB]
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nats -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
    text = corpus.read_text(encoding="utf-8")
    val_bytes = len(text[int(len(text) * 0.9) :].encode("utf-8"))
    expected = nats / math.log(2) / val_bytes
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.eval", "--init_from", str(run_dir), "--val_data", str(data)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    reported = float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("val_bpb")))
    assert reported == pytest.approx(expected, rel=1e-3)  # the first token is never a target: (n-1)/n


def test_sampling_reads_the_runs_tokenizer(run_dir):
    done = subprocess.run(
        [sys.executable, "sample.py", "--init_from", str(run_dir), "--prompt", "ROMEO:", "--max_new_tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ROMEO:")


def test_data_of_another_tokenizer_is_one_error_line(run_dir, gpt2_data, tmp_path):
    base = ["--data_dir", str(gpt2_data), *TINY, "--max_steps", "25", "--eval_interval", "0"]
    for args in (["--out_dir", str(run_dir)], ["--out_dir", str(tmp_path / "ft"), "--init_from", str(run_dir)]):
        done = run_train_cli([*base, *args])
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
        assert "GPT-2's" in done.stderr and "prepare the data again" in done.stderr


def test_hugging_face_export_carries_a_tokenizer_that_encodes_like_jaxgpt(run_dir, shakespeare_path, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    out = tmp_path / "hf"
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.convert", "--src", str(run_dir), "--dst", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    hf = AutoTokenizer.from_pretrained(out)
    ours = tokenizer_of(run_dir)
    text = shakespeare_path.read_text(encoding="utf-8")[-30_000:] + " naïve  café 🤖\n\n  x1 y2\t z 12345"
    ids = ours.encode(text)
    assert hf(text)["input_ids"] == ids and hf.decode(ids) == text
    assert hf.eos_token_id == ours.eot_id and hf("<|endoftext|>")["input_ids"] == [ours.eot_id]
    model = GPT2LMHeadModel.from_pretrained(out)
    assert model.config.vocab_size >= ours.vocab_size
    assert tokenizer_of(out).fingerprint == ours.fingerprint  # jaxgpt reads the export back with it
