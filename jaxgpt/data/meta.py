"""A dataset's ``meta.json``: what was written, checked against the shards before training uses them.

``prepare`` records every shard (file, split, token count, largest token id, each token looked at
once when it was written). Training refuses a directory whose ``meta.json`` is missing or disagrees
with the shards on disk (a half-replaced or hand-edited dataset), and one whose largest token id
does not fit the model's vocabulary, before anything is compiled.

Shards written elsewhere (llm.c's scripts, older jaxgpt) get a ``meta.json`` with
``python -m jaxgpt.data.meta DIR``, which reads every token once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxgpt.core.cli import ArgumentParser, run
from jaxgpt.core.errors import UserError
from jaxgpt.core.json_file import read_json, write_json
from jaxgpt.data import shards

META = "meta.json"


def shard_record(path: Path, split: str, tokens: Any) -> dict[str, Any]:
    """The meta.json entry of one shard, from its tokens."""
    return {"file": path.name, "split": split, "tokens": int(tokens.size), "max_token_id": int(tokens.max(initial=0))}


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """The dataset's ``meta.json``, replaced whole."""
    write_json(directory / META, meta, end="\n")


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The dataset's ``meta.json`` (its shards' records); missing or damaged, a UserError that says how to redo it."""
    path = Path(data_dir) / META
    fix = f"prepare the data again, or index shards made elsewhere with python -m jaxgpt.data.meta {data_dir}"
    if not path.is_file():
        shards.list_shards(data_dir, "train")  # a missing directory or no shards: that message first
        raise UserError(f"{data_dir} has no {META}, so it may be incomplete; {fix}")
    return read_json(path, "shards", list, "lists no shards (written by an older version)", fix)


def check_dataset(data_dir: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """The dataset's meta after checking it against the shards and ``vocab_size``; a UserError otherwise."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    listed = {record["file"]: record for record in meta["shards"]}
    on_disk = {p.name for split in shards.SPLITS for p in data_dir.glob(f"*_{split}_*.bin")}
    missing, extra = sorted(listed.keys() - on_disk), sorted(on_disk - listed.keys())
    if missing or extra:
        raise UserError(
            f"{data_dir} does not match its {META}: {len(missing)} listed shards missing {missing[:3]}, "
            f"{len(extra)} unlisted shards {extra[:3]}; prepare the data again"
        )
    for name, record in listed.items():
        if len(shards.open_shard(data_dir / name, vocab_size=None)) != record["tokens"]:  # header and size only
            raise UserError(f"{data_dir / name} does not hold the {record['tokens']} tokens {META} records for it")
    for split in shards.SPLITS:
        if not any(r["split"] == split and r["tokens"] for r in listed.values()):
            raise UserError(f"{data_dir} has no '{split}' tokens; prepare it with a --val_fraction above 0")
    largest = max(record["max_token_id"] for record in listed.values())
    if largest >= vocab_size:
        raise UserError(
            f"{data_dir} holds token ids up to {largest} but the model's vocab_size is {vocab_size}; "
            f"use --vocab_size {largest + 1} or more (GPT-2's tokenizer needs 50257), or data of a smaller vocabulary"
        )
    return meta


def index_dataset(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Writes ``meta.json`` for existing shards, reading every token once."""
    data_dir = Path(data_dir)
    records = [
        shard_record(path, split, shards.open_shard(path, vocab_size=1 << 16))
        for split in shards.SPLITS
        for path in shards.list_shards(data_dir, split)
    ]
    splits = {s: {"tokens": sum(r["tokens"] for r in records if r["split"] == s)} for s in shards.SPLITS}
    source = "indexed by python -m jaxgpt.data.meta"
    meta = {"name": data_dir.name, "source": source, "splits": splits, "shards": records}
    write_meta(data_dir, meta)
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxgpt.data.meta DIR``: writes meta.json for shards made elsewhere, so training accepts them."""
    parser = ArgumentParser(prog="python -m jaxgpt.data.meta", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="a folder of token shards (<name>_train_*.bin, <name>_val_*.bin)")
    meta = index_dataset(parser.parse_args(argv).data_dir)
    largest = max(r["max_token_id"] for r in meta["shards"])
    print(f"indexed {len(meta['shards'])} shards, largest token id {largest}", file=sys.stdout)


if __name__ == "__main__":
    run(main)
