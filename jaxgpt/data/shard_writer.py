"""Writing a split's tokens as shards of a fixed size, with meta.json's record of each (``prepare`` uses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.data import shards
from jaxgpt.data.meta import shard_record


class ShardWriter:
    """Buffers one split's tokens (and chat labels) and writes a shard each time ``shard_size`` are in."""

    def __init__(self, directory: Path, name: str, split: str, shard_size: int) -> None:
        self.directory, self.name, self.split, self.shard_size = directory, name, split, shard_size
        self.buffer: np.ndarray | None = None  # allocated on first use: a split may stay empty
        self.labels: np.ndarray | None = None  # chat data only
        self.filled = 0
        self.num_tokens = 0
        self.paths: list[Path] = []
        self.records: list[dict[str, Any]] = []  # meta.json's entry for each shard written

    def add(self, tokens: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Appends tokens (and, for chat, their loss labels) to the split, writing each shard as it fills."""
        assert tokens.dtype == np.uint16 and tokens.ndim == 1, (tokens.dtype, tokens.shape)
        assert labels is None or labels.shape == tokens.shape, (labels.shape, tokens.shape)
        if self.buffer is None:
            self.buffer = np.empty(self.shard_size, dtype=np.uint16)
            self.labels = None if labels is None else np.empty(self.shard_size, dtype=shards.LABEL_DTYPE)
        assert (labels is None) == (self.labels is None), "a split's examples all have labels or none"
        while tokens.size:
            take = min(self.shard_size - self.filled, tokens.size)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            if labels is not None:
                self.labels[self.filled : self.filled + take] = labels[:take]  # type: ignore[index]
                labels = labels[take:]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_size:
                self.flush()

    def flush(self) -> None:
        """Writes the partly filled shard, if any, and records it for meta.json."""
        if not self.filled:
            return
        path = self.directory / shards.shard_name(self.name, self.split, len(self.paths))
        shards.write_shard(path, self.buffer[: self.filled])
        self.records.append(shard_record(path, self.split, self.buffer[: self.filled]))
        if self.labels is not None:
            shards.write_labels(path, self.labels[: self.filled])
        self.paths.append(path)
        self.num_tokens += self.filled
        self.filled = 0
