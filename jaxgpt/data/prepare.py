"""Text -> GPT-2 token shards: ``python -m jaxgpt.data.prepare --input PATH --out_dir DIR``.

With ``--format chat`` the input is conversations in JSON lines (see
:mod:`jaxgpt.data.chat_source`), rendered with ``jaxgpt.chat``'s template, and every
token shard gets a label shard (the loss mask, see :mod:`jaxgpt.data.shards`).

The corpus is streamed (see :mod:`jaxgpt.data.sources` for the sources and the
train/val split), tokenised by a pool of worker processes and written in shards
of ``--shard_size`` tokens, so memory stays at about one shard per split whatever
the corpus size.

Crash safety: the new dataset is built in a sibling folder, ``.DIR.partial/`` (shards,
``meta.json`` recording every shard, and hard links to any other files ``DIR`` held), which
then replaces ``DIR`` in one rename (:mod:`jaxgpt.core.swap`). A run killed at any moment leaves
``DIR`` as it was, old dataset intact, or wholly new; the next run clears the leftover folder.
Training checks the shards against ``meta.json`` before it starts (:mod:`jaxgpt.data.meta`).
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from jaxgpt.chat.template import TEMPLATE
from jaxgpt.core import cli
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.core.swap import replace_dir, staging_dir
from jaxgpt.data import chat_source, preference, shards, sources
from jaxgpt.data.meta import META, write_meta
from jaxgpt.data.shard_writer import ShardWriter
from jaxgpt.data.sources import Piece
from jaxgpt.tokenizer import GPT2, Tokenizer, load_tokenizer
from jaxgpt.tokenizer.encoding import RANKS_FILE, SPEC_FILE
from jaxgpt.tokenizer.train import BPEConfig, train_on_corpus

WORK_CHARS = 1 << 20  # characters per task sent to a worker process


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Turn a text corpus (or chat conversations) into token shards (GPT-2's tokenizer or one trained for it)."""

    input: str | None = option(None, "a UTF-8 text file, or a folder of .txt / .jsonl files (jsonl: a 'text' field)")
    dataset: Literal["shakespeare", "openwebtext", "fineweb", "fineweb-edu", "alpaca", "dolly"] | None = option(
        None, "a named dataset to download instead of --input (fineweb*: the sample-10BT subsets; alpaca, dolly: chat)"
    )
    data_files: str | None = option(
        None, "with --dataset: its hub files (parquet/json) copied here, a file, glob or folder, read without a network"
    )
    tokenizer: str = option(
        GPT2,
        "gpt2, a folder holding a tokenizer (python -m jaxgpt.tokenizer train), or train:N to train one of N "
        "tokens on the train split (saved with the shards)",
    )
    format: Literal["text", "chat", "preference"] | None = option(
        None,
        "chat: JSON lines of conversations, written with loss masks; preference: TRL's prompt/chosen/rejected lines "
        "for DPO (None: chat for alpaca/dolly, else text)",
    )
    block_size: int = option(1024, "chat: the most tokens a conversation may have (training's --block_size)")
    truncate: bool = option(False, "chat: cut longer conversations to --block_size tokens instead of rejecting them")
    skip_bad: bool = option(False, "chat: skip bad lines (counted) instead of stopping at the first")
    out_dir: str | None = option(None, "folder for the shards and meta.json (None: data/<name>)")
    name: str | None = option(None, "shard file prefix (None: the dataset name or the input's file name)")
    val_fraction: float = option(0.1, "fraction of the characters (one file) or documents (many) held out for val")
    shard_size: int = option(100_000_000, "tokens per shard file (the last shard of a split may be shorter)")
    num_proc: int = option(0, "tokeniser worker processes (0: one per CPU core; 1: tokenise in this process)")

    def __post_init__(self) -> None:
        if (self.input is None) == (self.dataset is None):
            raise UserError("give exactly one of --input PATH (a text file or folder) or --dataset NAME")
        if self.input is not None and not Path(self.input).exists():
            raise UserError(f"--input {self.input} does not exist")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 < self.shard_size < 2**31:
            raise UserError(f"--shard_size must be in [1, 2**31), got {self.shard_size}")
        if self.num_proc < 0:
            raise UserError(f"--num_proc must be >= 0, got {self.num_proc}")
        if self.train_vocab_size is None and self.tokenizer != GPT2:
            load_tokenizer(self.tokenizer)  # a folder without a tokenizer: one line now
        if self.block_size < 2:
            raise UserError(f"--block_size must be at least 2, got {self.block_size}")
        if self.data_files is not None and self.dataset in (None, "shakespeare"):
            raise UserError("--data_files is a local copy of a hub dataset's files: use it with --dataset NAME")
        if self.format == "text" and self.dataset in chat_source.HUB_CHAT_DATASETS:
            raise UserError(f"--dataset {self.dataset} is a chat dataset: drop --format text")
        if self.format == "chat" and self.dataset is not None and self.dataset not in chat_source.HUB_CHAT_DATASETS:
            chat_sets = ", ".join(chat_source.HUB_CHAT_DATASETS)
            raise UserError(f"--dataset {self.dataset} is text, not chat; the chat datasets are {chat_sets}")
        if self.format == "preference" and self.input is None:
            raise UserError("--format preference reads --input (JSON lines with prompt, chosen, rejected)")

    @property
    def train_vocab_size(self) -> int | None:
        """N of ``--tokenizer train:N`` (None for gpt2 or a folder)."""
        if not self.tokenizer.startswith("train:"):
            return None
        try:
            return BPEConfig(vocab_size=int(self.tokenizer.removeprefix("train:"))).vocab_size
        except ValueError:
            raise UserError(f"--tokenizer train:N needs a number of tokens, got {self.tokenizer}") from None

    @property
    def is_chat(self) -> bool:
        """Whether the corpus is conversations (or preference pairs): --format chat or preference, or by default a
        hub chat dataset."""
        chat = self.format is None and self.dataset in chat_source.HUB_CHAT_DATASETS
        return self.format in ("chat", "preference") or chat

    @property
    def dataset_name(self) -> str:
        """The shards' file-name prefix: --name, else the hub dataset's name or the input file's stem."""
        if self.name:
            return self.name
        return self.dataset or Path(self.input).resolve().stem  # type: ignore[arg-type]

    @property
    def output_dir(self) -> Path:
        """Where the shards go: --out_dir, else data/<dataset_name>."""
        return Path(self.out_dir) if self.out_dir else Path("data") / self.dataset_name


def corpus_pieces(config: PrepareConfig, out_dir: Path) -> tuple[Iterator[Piece], str, bool]:
    """The corpus as pieces, a description of its source, and whether documents start with EOT."""
    if config.dataset == "shakespeare":
        path = sources.download_shakespeare(out_dir)
        return sources.single_text_pieces(path, config.val_fraction), sources.SHAKESPEARE_URL, False
    if config.dataset is not None:
        repo, subset = sources.HUB_DATASETS[config.dataset]
        documents = sources.hub_documents(config.dataset, config.data_files)
        source = config.data_files or f"hf://{repo}/{subset or ''}"
        return sources.document_pieces(documents, config.val_fraction), source, True
    pieces, eot_first = sources.path_pieces(Path(config.input), config.val_fraction)  # type: ignore[arg-type]
    return pieces, str(config.input), eot_first


def encode_pieces(pieces: Sequence[Piece], tokenizer: Tokenizer) -> list[tuple[str, np.ndarray, int]]:
    """Tokenises pieces (in a worker process): (split, uint16 tokens, UTF-8 bytes); EOT first where a document
    starts."""
    out = []
    for piece in pieces:
        ids = tokenizer.encode(piece.text)
        if piece.starts_document:
            ids.insert(0, tokenizer.eot_id)
        out.append((piece.split, np.asarray(ids, dtype=np.uint16), len(piece.text.encode("utf-8"))))
    return out


def group_pieces(pieces: Iterable[Piece], max_chars: int = WORK_CHARS) -> Iterator[list[Piece]]:
    """Bundles small pieces (short documents) into tasks of about ``max_chars`` characters."""
    group: list[Piece] = []
    size = 0
    for piece in pieces:
        group.append(piece)
        size += len(piece.text)
        if size >= max_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def bounded_imap(fn: Callable[[Any], Any], tasks: Iterable[Any], num_proc: int) -> Iterator[Any]:
    """``Pool.imap`` with at most ``2 * num_proc + 2`` tasks in flight (plain imap reads ahead without bound)."""
    if num_proc == 1:
        yield from map(fn, tasks)
        return
    slots = threading.Semaphore(2 * num_proc + 2)
    stop = threading.Event()

    def gated() -> Iterator[Any]:  # runs in the pool's task-feeding thread
        for task in tasks:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield task

    # The platform's default (fork on Linux: quick to start), but never fork once JAX's threads run here.
    context = multiprocessing.get_context("spawn" if "jax" in sys.modules else None)
    with context.Pool(num_proc) as pool:
        try:
            for result in pool.imap(fn, gated()):
                slots.release()
                yield result
        finally:
            stop.set()


def is_dataset_file(filename: str, name: str) -> bool:
    """Whether a file belongs to dataset ``name`` (replaced as a whole) rather than sitting beside it."""
    return filename in (META, RANKS_FILE, SPEC_FILE) or any(
        filename.startswith(f"{name}_{split}_") for split in shards.SPLITS
    )


def start_clean(out_dir: Path, name: str) -> Path:
    """Checks ``out_dir`` can be replaced as a whole, clears what a killed run left, returns a fresh staging folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a directory")
    if out_dir.is_dir():
        found = [p.name for split in shards.SPLITS for p in out_dir.glob(f"*_{split}_*.bin")]
        others = [filename for filename in found if not is_dataset_file(filename, name)]
        if others:
            raise UserError(
                f"{out_dir} already holds shards of another dataset ({', '.join(sorted(others)[:3])}); "
                f"the pipeline would mix them: use another --out_dir or remove them"
            )
        folders = [p.name for p in out_dir.iterdir() if p.is_dir() and p.name != ".partial"]  # .partial: old versions
        if folders:
            raise UserError(f"{out_dir} holds folders ({', '.join(sorted(folders)[:3])}); use an --out_dir of its own")
    staging = staging_dir(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out_dir: Path, name: str, meta: dict[str, Any]) -> None:
    """Replaces ``out_dir`` by the staged dataset in one rename; its other files come along (hard links)."""
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            if entry.is_file() and not is_dataset_file(entry.name, name) and not entry.name.endswith(".tmp"):
                try:
                    os.link(entry, staging / entry.name)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(entry, staging / entry.name)
    write_meta(staging, meta)
    replace_dir(staging, out_dir)


def check_not_empty(writers: dict[str, ShardWriter], val_fraction: float, source: str) -> None:
    """A UserError if the corpus gave no tokens to train on, or none for a val split that was asked for."""
    if writers["train"].num_tokens == 0:
        raise UserError(f"{source} holds no text: 0 tokens to train on")
    if val_fraction > 0 and writers["val"].num_tokens == 0:
        raise UserError(f"{source} is too short for a val split (0 tokens); give more text or a larger --val_fraction")


def dataset_tokenizer(config: PrepareConfig, out_dir: Path, staging: Path) -> Tokenizer:
    """GPT-2's, or the one asked for (trained on the train split, or read from a folder) saved with the shards."""
    if config.tokenizer == GPT2:
        return load_tokenizer()
    if config.train_vocab_size is None:
        load_tokenizer(config.tokenizer).save(staging)
    else:
        pieces = lambda: corpus_pieces(config, out_dir)[0]  # each pass reads the corpus again
        train_on_corpus(pieces, BPEConfig(vocab_size=config.train_vocab_size), staging, config.dataset_name)
    return load_tokenizer(str(staging))


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Tokenises the corpus into shards in ``config.output_dir``; returns the metadata written to meta.json."""
    out_dir, name = config.output_dir, config.dataset_name
    if config.tokenizer == GPT2:
        load_tokenizer()  # fail early (and in one line) when the BPE ranks are missing
    staging = start_clean(out_dir, name)
    writers = {split: ShardWriter(staging, name, split, config.shard_size) for split in shards.SPLITS}
    num_proc = config.num_proc or os.cpu_count() or 1
    bad = chat_source.BadLines(config.skip_bad)
    conversations = {split: 0 for split in shards.SPLITS}
    longest = 0  # chat: tokens of the longest conversation (what --block_size must hold)
    text_bytes = {split: 0 for split in shards.SPLITS}  # text: UTF-8 bytes tokenised (for bits per byte)
    try:
        tokenizer = dataset_tokenizer(config, out_dir, staging)
        if config.is_chat:
            if config.format == "preference":
                found, source = preference.pairs(config.input, config.val_fraction, bad)  # type: ignore[arg-type]
            else:
                found, source = chat_source.conversations(
                    config.input, config.dataset, config.val_fraction, bad, config.data_files
                )
            source_module = preference if config.format == "preference" else chat_source
            encode = functools.partial(
                source_module.encode_batch, tokenizer=tokenizer, block_size=config.block_size, truncate=config.truncate
            )
            accepted = chat_source.accepted(bounded_imap(encode, chat_source.batches(found), num_proc), bad)
            examples = ((split, tokens, labels, 0) for split, tokens, labels in accepted)
            eot = "starts each conversation and ends each assistant turn (jaxgpt.chat)"
        else:
            pieces, source, eot_first = corpus_pieces(config, out_dir)
            encoded = bounded_imap(
                functools.partial(encode_pieces, tokenizer=tokenizer), group_pieces(pieces), num_proc
            )
            examples = ((split, tokens, None, size) for batch in encoded for split, tokens, size in batch)
            eot = "before each document" if eot_first else "none (one document per split)"
        with tqdm(desc=f"tokenizing {name}", unit="tok", unit_scale=True, disable=None) as progress:
            for split, tokens, labels, size in examples:
                writers[split].add(tokens, labels)
                text_bytes[split] += size
                conversations[split] += 1
                longest = max(longest, tokens.size)
                progress.update(tokens.size)
        for writer in writers.values():
            writer.flush()
        check_not_empty(writers, config.val_fraction, source)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a run that failed cleanly leaves nothing behind
        raise
    meta = {
        "name": name,
        "source": source,
        "tokenizer": tokenizer.name,
        "tokenizer_source": config.tokenizer,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "eot": eot,
        "dtype": "uint16",
        "val_fraction": config.val_fraction,
        "shard_size": config.shard_size,
        "splits": {s: {"tokens": w.num_tokens, "shards": len(w.paths)} for s, w in writers.items()},
        "shards": [record for writer in writers.values() for record in writer.records],
    }
    if not config.is_chat:
        for split, size in text_bytes.items():
            meta["splits"][split]["bytes"] = size  # tokens / bytes turns nats per token into bits per byte
    if config.is_chat:
        meta.update(
            format=config.format or "chat", template=TEMPLATE, block_size=config.block_size, truncate=config.truncate
        )
        meta.update(longest_conversation=longest, skipped_bad_lines=bad.count, first_skipped=bad.first)
        for split, count in conversations.items():
            meta["splits"][split]["conversations"] = count
    publish(staging, out_dir, name, meta)
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxgpt.data.prepare``: tokenises a corpus into shards and says what it wrote."""
    config = cli.parse(PrepareConfig, argv, prog="python -m jaxgpt.data.prepare")
    meta = prepare(config)
    counts = {split: meta["splits"][split] for split in shards.SPLITS}
    print(
        f"wrote {config.output_dir}: train {counts['train']['tokens']:,} tokens in {counts['train']['shards']} shards, "
        f"val {counts['val']['tokens']:,} tokens in {counts['val']['shards']} shards"
    )
    if config.is_chat:
        conversations = f"{counts['train']['conversations']:,} train and {counts['val']['conversations']:,} val"
        skipped = f"; skipped {meta['skipped_bad_lines']} bad lines (first: {meta['first_skipped']})"
        longest = f", the longest {meta['longest_conversation']} tokens"
        print(f"conversations: {conversations}{longest}" + (skipped if meta["skipped_bad_lines"] else ""))


if __name__ == "__main__":
    cli.run(main)
