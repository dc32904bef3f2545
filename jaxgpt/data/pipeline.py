"""Training and evaluation batches from token shards, through Grain.

Examples: a split's shards are read as ONE concatenated, memory-mapped token
stream, and example ``i`` is the window ``tokens[i*T : i*T + T + 1]`` (T =
block_size): non-overlapping windows at stride T, the extra token being the last
target (``inputs = w[:-1]``, ``targets = w[1:]``). An epoch is the
``(num_tokens - 1) // T`` windows; the tail that does not fill one is skipped.

Training order: a Grain ``MapDataset`` of window ids,
``range(num_windows).shuffle(seed).repeat().batch(global_batch_size)``, so every
epoch is a fresh permutation (Grain folds the epoch into the seed) and GLOBAL
batch ``s`` is fixed by ``(data, block_size, global_batch_size, seed)`` alone.
Process ``p`` of ``P`` keeps rows ``[p*B, (p+1)*B)`` of it (B = global/P) and
reads only those windows, each with one memmap slice per shard it touches.
Threads (``data_workers``) read batches ahead.

Chat shards (a label shard beside each token shard, see :mod:`jaxgpt.data.shards`):
example ``i`` is conversation ``i`` instead, alone in its row and padded to T
(:class:`Conversations`), with a third array ``weights``, 1.0 where the target is an
assistant token. Padding rather than packing keeps attention inside each conversation
with the model's plain causal mask (the padding comes after the conversation, so no
real token sees it), starts every conversation at position 0 as generation does, and
leaves the model and its attention kernels untouched; the price is the padded positions'
compute (TRL's SFTTrainer pads by default too). Pretraining batches have no ``weights``:
their path costs nothing more.

State: the iterator's position is the global step, so ``it.get_state()`` is
``{"next_index": step}``, the same on every process and for any process count.
:func:`iterator_state` wraps it with what it is valid for; :func:`restore_iterator`
checks that and resumes, with any process count: the global batches do not
depend on it (only the rows each process reads do).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.data import shards
from jaxgpt.data.meta import read_meta
from jaxgpt.data.preference import FORMAT as PREFERENCE_FORMAT

STATE_FORMAT = "jaxgpt.data.train_iterator/1"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: which shards and how they are cut into batches."""

    data_dir: str = option("data/shakespeare", "folder of token shards written by jaxgpt.data.prepare")
    block_size: int = option(64, "tokens per example (the model's context length)")
    global_batch_size: int = option(12, "examples per step summed over all processes (split evenly between them)")
    seed: int = option(1337, "shuffling seed (0..2**32-1); every epoch is reshuffled from it")
    data_workers: int = option(0, "threads reading batches ahead (0: read each batch when it is asked for)")
    prefetch: int = option(8, "batches read ahead by the worker threads")
    vocab_size: int | None = option(50257, "every id read must be below this, else the run stops (None: unchecked)")

    def __post_init__(self) -> None:
        for name in ("block_size", "global_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.data_workers < 0 or self.prefetch < 0:
            raise UserError(f"data_workers and prefetch must be >= 0, got {self.data_workers} and {self.prefetch}")


class TokenStream:
    """The shards of one split as a single random-access token sequence (memory-mapped, validated on open).

    ``labels`` holds the label shards (chat data) or is None (pretraining data). Every token read is
    checked to be below ``vocab_size`` (one vectorised max over the rows, a few microseconds a batch;
    ``None``: unchecked), so a shard changed after ``prepare`` stops the run with its file and offset
    instead of training on ids past the model's vocabulary (an index past an array is no error in JAX).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], vocab_size: int | None = 50257) -> None:
        self.paths = [Path(p) for p in paths]
        self.vocab_size = vocab_size
        self.shards = [shards.open_shard(p, vocab_size=vocab_size) for p in self.paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # global offset of each shard
        self.num_tokens = int(self.starts[-1])
        self.labels = None
        if shards.has_labels(self.paths):
            self.labels = [shards.open_labels(p, len(s)) for p, s in zip(self.paths, self.shards, strict=True)]

    @classmethod
    def open(cls, data_dir: str | os.PathLike, split: str, vocab_size: int | None = 50257) -> TokenStream:
        """The shards of one split of a dataset directory, read as one stream (ids checked below ``vocab_size``)."""
        if split not in shards.SPLITS:
            raise UserError(f"split must be one of {shards.SPLITS}, got {split!r}")
        return cls(shards.list_shards(data_dir, split), vocab_size)

    def num_windows(self, block_size: int) -> int:
        """Non-overlapping windows of ``block_size + 1`` tokens at stride ``block_size``."""
        return max(0, (self.num_tokens - 1) // block_size)

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """``tokens[s : s + length]`` for each start, as int32 rows; a row may straddle shards."""
        tokens = self._read(self.shards, starts, length)
        if self.vocab_size is not None and tokens.size and tokens.max() >= self.vocab_size:
            self._out_of_vocabulary(starts, tokens)
        return tokens

    def _out_of_vocabulary(self, starts: np.ndarray, tokens: np.ndarray) -> None:
        """Names the first id read that is not below ``vocab_size``: its shard and position in it."""
        row, col = np.unravel_index(int(np.argmax(tokens >= self.vocab_size)), tokens.shape)
        position = int(starts[row]) + int(col)
        k = int(np.searchsorted(self.starts, position, side="right")) - 1
        offset = position - int(self.starts[k])
        raise shards.ShardError(
            f"{self.paths[k]}: token id {int(tokens[row, col])} at token {offset:,} (byte "
            f"{shards.HEADER_BYTES + offset * shards.TOKEN_DTYPE.itemsize:,}) is outside the vocabulary "
            f"(size {self.vocab_size}); the shard changed after it was prepared: prepare the data again"
        )

    def read_labels(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The labels of the tokens ``read`` returns (chat data only)."""
        assert self.labels is not None, "not chat data"
        return self._read(self.labels, starts, length)

    def _read(self, parts: list[np.ndarray], starts: np.ndarray, length: int) -> np.ndarray:
        out = np.empty((len(starts), length), dtype=np.int32)
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        for row, (start, k) in enumerate(zip(starts.tolist(), shard_of.tolist(), strict=True)):
            assert start >= 0 and start + length <= self.num_tokens, (start, length, self.num_tokens)
            done = 0
            while done < length:
                offset = start + done - int(self.starts[k])
                take = min(length - done, len(parts[k]) - offset)
                out[row, done : done + take] = parts[k][offset : offset + take]
                done += take
                k += 1
        return out


def windows_to_batch(stream: TokenStream, window_ids: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    """Reads windows and splits them into int32 ``inputs`` and next-token ``targets`` of shape [B, T]."""
    tokens = stream.read(np.asarray(window_ids, dtype=np.int64) * block_size, block_size + 1)
    batch = {"inputs": np.ascontiguousarray(tokens[:, :-1]), "targets": np.ascontiguousarray(tokens[:, 1:])}
    assert batch["inputs"].shape == (len(window_ids), block_size), batch["inputs"].shape
    return batch


@dataclasses.dataclass(frozen=True)
class Windows:
    """Pretraining examples: the split's non-overlapping windows (see the module doc)."""

    stream: TokenStream
    block_size: int

    def __len__(self) -> int:
        return self.stream.num_windows(self.block_size)

    def batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs and targets [len(ids), block_size] of the windows ``ids``."""
        return windows_to_batch(self.stream, ids, self.block_size)


class Conversations:
    """Chat examples: conversation ``i`` alone in a row of ``block_size``, padded, with loss ``weights``."""

    def __init__(self, stream: TokenStream, block_size: int) -> None:
        assert stream.labels is not None, "not chat data"
        self.stream, self.block_size = stream, block_size
        offsets = stream.starts[:-1]
        firsts = [np.flatnonzero(lab & shards.START) + o for lab, o in zip(stream.labels, offsets, strict=True)]
        starts = np.concatenate([np.zeros(0, np.int64), *firsts])
        assert not len(starts) or starts[0] == 0, "chat shards start with a conversation"
        self.bounds = np.append(starts, stream.num_tokens)  # conversation i is tokens[bounds[i]:bounds[i + 1]]
        longest = int(np.diff(self.bounds).max(initial=0))
        if longest > block_size + 1:  # its inputs, all but the last token, must fit the context
            raise UserError(
                f"{stream.paths[0].parent} holds a conversation of {longest} tokens, more than block_size + 1 = "
                f"{block_size + 1}; train with a larger --block_size or prepare again with --block_size "
                f"{block_size} --truncate"
            )

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs, targets and loss weights [len(ids), block_size] of conversations ``ids``, each alone in
        its row, padded with weight 0."""
        shape = (len(ids), self.block_size)
        batch = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32)}
        batch["weights"] = np.zeros(shape, np.float32)
        for row, i in enumerate(np.asarray(ids).tolist()):
            start, n = self.bounds[i : i + 1], int(self.bounds[i + 1] - self.bounds[i])
            tokens, labels = self.stream.read(start, n)[0], self.stream.read_labels(start, n)[0]
            batch["inputs"][row, : n - 1], batch["targets"][row, : n - 1] = tokens[:-1], tokens[1:]
            batch["weights"][row, : n - 1] = labels[1:] & shards.LOSS
        return batch


class Pairs(Conversations):
    """Preference examples (``prepare --format preference``): pair ``i`` is conversations ``2i`` (chosen) and
    ``2i + 1`` (rejected), batched as ``chosen_*`` and ``rejected_*`` arrays of the same rows."""

    def __len__(self) -> int:
        return super().__len__() // 2

    def batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = 2 * np.asarray(ids)
        halves = {"chosen": super().batch(ids), "rejected": super().batch(ids + 1)}
        return {f"{half}_{key}": value for half, batch in halves.items() for key, value in batch.items()}


Examples = Windows | Conversations | Pairs


@dataclasses.dataclass(frozen=True)
class _ReadRows:
    """Grain map: a global batch of example ids -> this process's rows of it, read from the shards."""

    examples: Examples
    rows: slice

    def __call__(self, example_ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.examples.batch(example_ids[self.rows])


def process_rows(global_batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's rows of every global batch (process index and count default to JAX's)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise UserError(f"process_index {index} is outside [0, {count})")
    if global_batch_size % count:
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by the {count} processes; "
            f"use a multiple of {count}"
        )
    local = global_batch_size // count
    return slice(index * local, (index + 1) * local)


def open_examples(data_dir: str | os.PathLike, split: str, block_size: int, vocab_size: int | None = 50257) -> Examples:
    """The split's examples: conversations for chat shards, windows otherwise; none at all is an error."""
    stream = TokenStream.open(data_dir, split, vocab_size)
    examples = Windows(stream, block_size) if stream.labels is None else Conversations(stream, block_size)
    if stream.labels is not None and read_meta(data_dir).get("format") == PREFERENCE_FORMAT:
        examples = Pairs(stream, block_size)
    if len(examples) == 0:
        raise UserError(
            f"the '{split}' split of {data_dir} has {stream.num_tokens} tokens, fewer than one example of "
            f"block_size + 1 = {block_size + 1}; use a smaller block_size or more data"
        )
    return examples


def make_train_iterator(
    config: DataConfig, *, process_index: int | None = None, process_count: int | None = None
) -> grain.DatasetIterator:
    """This process's infinite, shuffled batches: ``{"inputs", "targets"}``, int32 [global_batch / processes, T]
    (chat data: plus float32 ``weights``)."""
    examples = open_examples(config.data_dir, "train", config.block_size, config.vocab_size)
    rows = process_rows(config.global_batch_size, process_index, process_count)
    dataset = (
        grain.MapDataset.range(len(examples))
        .shuffle(seed=config.seed)
        .repeat()
        .batch(config.global_batch_size, drop_remainder=True)
        .map(_ReadRows(examples, rows))
    )
    threads = config.data_workers if config.prefetch else 0
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(config.prefetch, threads))
    return iter(dataset.to_iter_dataset(options))


def train_tokens(data_dir: str | os.PathLike) -> int:
    """Tokens in the train split (from the shard headers): identifies the data a state belongs to."""
    return TokenStream.open(data_dir, "train").num_tokens


def iterator_state(
    it: grain.DatasetIterator, config: DataConfig, *, process_count: int | None = None
) -> dict[str, Any]:
    """The iterator's position plus what it is valid for, JSON-serialisable (save it with the checkpoint)."""
    return {
        "format": STATE_FORMAT,
        "grain": it.get_state(),  # {"next_index": global step}
        "seed": config.seed,
        "block_size": config.block_size,
        "global_batch_size": config.global_batch_size,
        "train_tokens": train_tokens(config.data_dir),
        "process_count": jax.process_count() if process_count is None else process_count,  # informational
    }


def restore_iterator(
    config: DataConfig,
    state: dict[str, Any],
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """A train iterator resuming where ``state`` left off; refuses states of other data or batch shapes.

    The process count may differ from the saved one: global batch ``s`` is the same
    whatever it is, and each process reads its rows of it.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"not a data iterator state saved by iterator_state() (expected format {STATE_FORMAT})")
    now = {"seed": config.seed, "block_size": config.block_size, "global_batch_size": config.global_batch_size}
    now["train_tokens"] = train_tokens(config.data_dir)
    changed = [f"{key} {state[key]} -> {value}" for key, value in now.items() if state[key] != value]
    if changed:
        raise UserError(
            f"cannot resume the data iterator: {', '.join(changed)} since it was saved; the saved position "
            f"means nothing with other data, seed or batch shape: resume with the saved values, or pass --reset_data "
            "to start the data order from the first batch"
        )
    it = make_train_iterator(config, process_index=process_index, process_count=process_count)
    it.set_state(state["grain"])
    return it
