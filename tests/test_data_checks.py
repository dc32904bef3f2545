"""Data that passes every check it claims: out-of-vocabulary ids in a prepared shard stop training with the
shard and offset; the hub loaders run on local files in the hub's own format, read through `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from jaxgpt.chat.template import render
from jaxgpt.core.errors import UserError
from jaxgpt.data import shards
from jaxgpt.data.pipeline import DataConfig, make_train_iterator
from jaxgpt.data.prepare import main as prepare
from jaxgpt.tokenizer import load_tokenizer
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import train

BAD = np.arange(50) * 1200 + 1  # 50 odd positions among the shard's first 60,000 tokens
SMALL = ["--num_proc", "1", "--block_size", "64", "--val_fraction"]  # prepare's flags, then the fraction
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "64"]


@pytest.fixture(scope="module")
def changed_data(shakespeare_path, tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared, then 50 train ids overwritten with ids >= 50257 (meta.json untouched)."""
    data = tmp_path_factory.mktemp("changed") / "data"
    prepare(["--input", str(shakespeare_path), "--out_dir", str(data), "--num_proc", "1"])
    [train_shard] = shards.list_shards(data, "train")
    tokens = np.memmap(train_shard, dtype=shards.TOKEN_DTYPE, mode="r+", offset=shards.HEADER_BYTES)
    assert len(tokens) > 60_000
    tokens[BAD] = 60_000 + np.arange(50)
    tokens.flush()
    shards.open_shard(train_shard)  # the check on open samples every 4th id here: it misses odd positions
    return data


def _bad_position(message: str, shard: Path) -> int:
    assert message.startswith(f"{shard}: token id 6") and "outside the vocabulary (size 50257)" in message, message
    offset = int(message.split(" at token ")[1].split(" ")[0].replace(",", ""))
    assert offset in BAD and int(message.split("token id ")[1].split(" ")[0]) == 60_000 + list(BAD).index(offset)
    assert f"(byte {shards.HEADER_BYTES + 2 * offset:,})" in message
    return offset


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_with_an_id_past_the_vocabulary_names_its_shard_and_offset(changed_data, workers):
    [shard] = shards.list_shards(changed_data, "train")
    it = make_train_iterator(DataConfig(str(changed_data), 64, 8, data_workers=workers), process_count=1)
    with pytest.raises(shards.ShardError) as err:
        for _ in range(5000):  # more than an epoch of 4,718 windows in batches of 8
            next(it)
    _bad_position(str(err.value), shard)


def test_training_stops_at_the_changed_ids(changed_data, tmp_path):
    [shard] = shards.list_shards(changed_data, "train")
    args = ["--preset", "shakespeare-gpt2", "--data_dir", str(changed_data), "--out_dir", str(tmp_path / "out")]
    args += [*TINY, "--batch_size", "8"]
    args += ["--max_steps", "2000", "--eval_interval", "0", "--log_interval", "1000", "--sample_tokens", "0"]
    with pytest.raises(shards.ShardError) as err:
        train(parse_run_config(args))
    _bad_position(str(err.value), shard)


DOCUMENTS = [f"Document {i}: {' '.join(['word'] * i)} ends here.\nA second line, {i}." for i in range(8)]


@pytest.mark.parametrize("dataset", ["fineweb", "fineweb-edu", "openwebtext"])
def test_text_datasets_from_their_hub_parquet_files(dataset, tmp_path):
    """The rows of the hub's parquet (text plus fineweb's other columns), tokenised as documents."""
    files = tmp_path / "hub" / "sample" / "10BT"
    files.mkdir(parents=True)
    columns = {"text": DOCUMENTS, "id": [f"<urn:{i}>" for i in range(8)], "token_count": list(range(8))}
    for part in range(2):  # two files, read in order
        table = pa.table({k: v[part * 4 : part * 4 + 4] for k, v in columns.items()})
        pq.write_table(table, files / f"00{part}_00000.parquet")
    out = tmp_path / "data"
    prepare(["--dataset", dataset, "--data_files", str(files / "*.parquet"), "--out_dir", str(out), *SMALL, "0.25"])
    gpt2 = tiktoken.get_encoding("r50k_base")  # GPT-2's ranks
    for split, docs in (("val", [0, 4]), ("train", [1, 2, 3, 5, 6, 7])):
        expected = [t for i in docs for t in [gpt2.eot_token, *gpt2.encode_ordinary(DOCUMENTS[i])]]
        [shard] = shards.list_shards(out, split)
        assert shards.open_shard(shard).tolist() == expected
    assert json.loads((out / "meta.json").read_text())["source"] == str(files / "*.parquet")


ROWS = [("Name a colour.", "", "Blue."), ("Add the numbers.", "2 and 3", "5."), ("Say hi.", "", "Hi.")]


@pytest.mark.parametrize("dataset", ["alpaca", "dolly"])
def test_chat_datasets_from_their_hub_files(dataset, tmp_path):
    """alpaca's parquet (instruction, input, output, text) and dolly's JSON lines, as conversations."""
    (tmp_path / "hub").mkdir()
    if dataset == "alpaca":
        table = {"instruction": [r[0] for r in ROWS], "input": [r[1] for r in ROWS], "output": [r[2] for r in ROWS]}
        table["text"] = [f"Below is an instruction. {r[0]}" for r in ROWS]
        pq.write_table(pa.table(table), tmp_path / "hub" / "train-00000-of-00001.parquet")
    else:
        lines = [{"instruction": q, "context": c, "response": a, "category": "qa"} for q, c, a in ROWS]
        (tmp_path / "hub" / "databricks-dolly-15k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "data"
    prepare(["--dataset", dataset, "--data_files", str(tmp_path / "hub"), "--out_dir", str(out), *SMALL, "0.34"])
    conversations = [
        [{"role": "user", "content": q + (f"\n\n{c}" if c else "")}, {"role": "assistant", "content": a}]
        for q, c, a in ROWS
    ]
    for split, rows in (("val", [0]), ("train", [1, 2])):
        [shard] = shards.list_shards(out, split)
        expected = [t for i in rows for t in render(conversations[i], load_tokenizer()).tokens]
        assert shards.open_shard(shard).tolist() == expected


def test_data_files_without_a_hub_dataset_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--data_files .* --dataset"):
        prepare(["--input", str(tmp_path), "--data_files", str(tmp_path)])
    with pytest.raises(UserError, match=r"no \.parquet/\.json/\.jsonl files"):
        prepare(["--dataset", "fineweb", "--data_files", str(tmp_path / "*.parquet"), "--out_dir", str(tmp_path)])
