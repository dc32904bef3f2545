"""Data preparation: nanoGPT's Shakespeare figures, documents and EOT, determinism, crash safety, the CLI."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.core.errors import UserError
from jaxgpt.core.swap import staging_dir
from jaxgpt.data import shards, sources
from jaxgpt.data.prepare import PrepareConfig, prepare
from jaxgpt.tokenizer import EOT_ID, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def split_tokens(out_dir: Path, split: str) -> np.ndarray:
    return np.concatenate([shards.open_shard(p) for p in shards.list_shards(out_dir, split)])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxgpt.data.prepare", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_shakespeare_gives_nanogpts_token_counts_and_decodes_back(shakespeare_path: Path, tmp_path: Path) -> None:
    meta = prepare(PrepareConfig(input=str(shakespeare_path), out_dir=str(tmp_path), num_proc=1))
    assert meta["splits"]["train"]["tokens"] == 301_966
    assert meta["splits"]["val"]["tokens"] == 36_059
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["tokenizer"] == "r50k_base" and meta["eot_id"] == EOT_ID and meta["dtype"] == "uint16"
    text = shakespeare_path.read_text(encoding="utf-8")
    train, val = split_tokens(tmp_path, "train"), split_tokens(tmp_path, "val")
    assert EOT_ID not in train and EOT_ID not in val
    decode = load_tokenizer().decode
    assert decode(train) + decode(val) == text
    assert decode(train) == text[: int(len(text) * 0.9)]


def test_cutting_into_pieces_keeps_the_tokens(shakespeare_path: Path, tmp_path: Path) -> None:
    text = shakespeare_path.read_text(encoding="utf-8")[:60_000] + " naïve  café\n\n  x1 y2\t z"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(sources.read_pieces(path, chunk_chars=500))
    assert len(pieces) > 100 and "".join(pieces) == text
    tokenizer = load_tokenizer()
    assert [t for p in pieces for t in tokenizer.encode(p)] == tokenizer.encode(text)


def write_corpus(folder: Path) -> tuple[list[str], list[str]]:
    """Seven documents (three .txt files, four .jsonl lines); returns the (train, val) documents in order."""
    docs = [f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(40 + 7 * i)) + "\n" for i in range(7)]
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0])
    (folder / "b.jsonl").write_text(
        "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[1:5], 1))
    )
    (folder / "empty.txt").write_text("")  # skipped: no document, no EOT
    (folder / "sub" / "c.txt").write_text(docs[5])
    (folder / "sub" / "d.txt").write_text(docs[6])
    (folder / "notes.md").write_text("ignored")
    val = [i for i in range(7) if sources.is_val_document(i, 0.25)]
    assert val == [0, 4]  # floor(i / 4) steps up at 0 and 4
    return [d for i, d in enumerate(docs) if i not in val], [docs[i] for i in val]


def test_multi_document_folder(tmp_path: Path) -> None:
    train_docs, val_docs = write_corpus(tmp_path / "corpus")
    config = PrepareConfig(
        input=str(tmp_path / "corpus"), out_dir=str(tmp_path / "a"), val_fraction=0.25, shard_size=64
    )
    meta = prepare(dataclasses.replace(config, num_proc=2))
    assert meta["name"] == "corpus" and meta["eot"] == "before each document"
    assert meta["splits"]["train"]["shards"] > 3
    decode = load_tokenizer().decode
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens = split_tokens(tmp_path / "a", split)
        assert tokens[0] == EOT_ID and int((tokens == EOT_ID).sum()) == len(docs)
        assert decode(tokens) == "".join("<|endoftext|>" + d for d in docs)
    # Determinism: a second run (one process this time) writes byte-identical files.
    prepare(dataclasses.replace(config, out_dir=str(tmp_path / "b"), num_proc=1))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"x\.jsonl:2: .*'text'"):
        prepare(PrepareConfig(input=str(tmp_path / "in"), out_dir=str(tmp_path / "out"), num_proc=1))
    assert not staging_dir(tmp_path / "out").exists()


def test_a_run_that_dies_half_way_leaves_no_dataset(tmp_path: Path, shakespeare_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    config = PrepareConfig(input=str(shakespeare_path), out_dir=str(out), shard_size=50_000, num_proc=1)
    prepare(config)  # a complete earlier dataset: it must survive the failed run below
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write, calls = shards.write_shard, []

    def failing_write(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_write(path, tokens)

    monkeypatch.setattr(shards, "write_shard", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(dataclasses.replace(config, shard_size=20_000))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert all(p.parent == staging_dir(out) for p in calls)  # shards were staged, never written in place


def test_a_killed_run_leaves_no_shard_in_place(tmp_path: Path, shakespeare_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text(shakespeare_path.read_text(encoding="utf-8") * 40, encoding="utf-8")
    out = tmp_path / "out"
    args = ["--input", str(big), "--out_dir", str(out), "--shard_size", "100000", "--num_proc", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.data.prepare", *args], cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(staging_dir(out).glob("*.bin")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    staged = list(staging_dir(out).iterdir())
    assert staged, "the run ended before it could be killed"
    assert not out.exists()  # the dataset appears whole or not at all
    for path in staged:  # what the killed run staged is whole shards or temporary files
        assert path.name.endswith(".tmp") or shards.open_shard(path).size == 100_000
    # The next run clears the leftovers and succeeds.
    prepare(PrepareConfig(input=str(shakespeare_path), out_dir=str(out), name="big", num_proc=1))
    assert not staging_dir(out).exists()
    assert sorted(p.name for p in out.iterdir()) == ["big_train_000000.bin", "big_val_000000.bin", "meta.json"]


def test_refuses_to_mix_with_another_datasets_shards(tmp_path: Path, shakespeare_path: Path) -> None:
    shards.write_shard(tmp_path / "other_train_000000.bin", np.arange(10, dtype=np.uint16))
    with pytest.raises(UserError, match="another dataset"):
        prepare(PrepareConfig(input=str(shakespeare_path), out_dir=str(tmp_path), num_proc=1))


def test_shakespeare_download(tmp_path: Path, shakespeare_path: Path, monkeypatch) -> None:
    def offline(url, timeout=30.0):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sources, "fetch", offline)
    with pytest.raises(UserError, match=r"--input \.\./shared/data/tinyshakespeare\.txt"):
        prepare(PrepareConfig(dataset="shakespeare", out_dir=str(tmp_path)))
    monkeypatch.setattr(sources, "fetch", lambda url, timeout=30.0: shakespeare_path.read_bytes())
    meta = prepare(PrepareConfig(dataset="shakespeare", out_dir=str(tmp_path), num_proc=1))
    assert meta["name"] == "shakespeare" and meta["source"] == sources.SHAKESPEARE_URL
    assert (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]) == (301_966, 36_059)


def test_hub_datasets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(UserError, match="--input PATH"):
        prepare(PrepareConfig(dataset="fineweb", out_dir=str(tmp_path / "a"), num_proc=1))
    calls = []

    def load_dataset(repo, name=None, split=None, streaming=False):
        calls.append((repo, name, split, streaming))
        return [{"text": f"row {i}", "id": i} for i in range(5)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    meta = prepare(PrepareConfig(dataset="fineweb-edu", out_dir=str(tmp_path / "b"), val_fraction=0.2, num_proc=1))
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert load_tokenizer().decode(split_tokens(tmp_path / "b", "val")) == "<|endoftext|>row 0"
    assert meta["splits"]["train"]["tokens"] == 4 * 3  # EOT, "row", " N" per document


def test_cli_prints_counts_and_reports_mistakes_in_one_line(tmp_path: Path, shakespeare_path: Path) -> None:
    done = run_cli("--input", str(shakespeare_path), "--out_dir", str(tmp_path), "--num_proc", "2")
    assert done.returncode == 0, done.stderr
    assert "train 301,966 tokens" in done.stdout and "val 36,059 tokens" in done.stdout
    for args in (["--input", str(tmp_path / "missing.txt")], []):
        failed = run_cli(*args)
        assert failed.returncode == 2
        assert failed.stderr.startswith("error: ") and len(failed.stderr.strip().splitlines()) == 1
        assert "Traceback" not in failed.stderr and "--input" in failed.stderr


def test_a_tokenizer_trained_for_the_corpus_is_saved_with_the_shards(shakespeare_path: Path, tmp_path: Path) -> None:
    from jaxgpt.tokenizer import tokenizer_of

    text = shakespeare_path.read_text(encoding="utf-8")
    meta = prepare(PrepareConfig(input=str(shakespeare_path), out_dir=str(tmp_path / "a"), tokenizer="train:1024"))
    tokenizer = tokenizer_of(tmp_path / "a")
    assert not tokenizer.is_gpt2 and tokenizer.vocab_size == meta["vocab_size"] == 1024
    assert meta["tokenizer_fingerprint"] == tokenizer.fingerprint and meta["eot_id"] == 1023
    boundary = int(len(text) * 0.9)
    assert meta["splits"]["train"]["bytes"] == len(text[:boundary].encode())
    assert meta["splits"]["val"]["bytes"] == len(text[boundary:].encode())
    val = split_tokens(tmp_path / "a", "val")
    assert tokenizer.decode(val) == text[boundary:] and len(val) == meta["splits"]["val"]["tokens"]
    assert 2 * len(val) < meta["splits"]["val"]["bytes"]  # merges learnt: over two bytes a token
    # the saved tokenizer, given as a folder, makes the same shards (and travels with them)
    again = prepare(
        PrepareConfig(input=str(shakespeare_path), out_dir=str(tmp_path / "b"), tokenizer=str(tmp_path / "a"))
    )
    assert again["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]
    np.testing.assert_array_equal(split_tokens(tmp_path / "b", "val"), val)
    assert tokenizer_of(tmp_path / "b").fingerprint == tokenizer.fingerprint


def test_bad_tokenizer_flags_are_one_line(shakespeare_path: Path, tmp_path: Path) -> None:
    for flag, message in [
        ("nothere", "holds no tokenizer"),
        ("train:x", "number of tokens"),
        ("train:70000", "uint16"),
    ]:
        done = run_cli("--input", str(shakespeare_path), "--out_dir", str(tmp_path / "d"), "--tokenizer", flag)
        assert done.returncode == 2 and done.stderr.startswith("error:") and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
