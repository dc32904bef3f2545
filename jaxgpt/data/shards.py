"""Token shards on disk: llm.c's format, so shards from either project work in both.

A shard is a 1024-byte header of 256 little-endian int32 (``[0]`` magic 20240520,
``[1]`` version 1, ``[2]`` number of tokens, the rest zero) followed by the tokens
as little-endian uint16. Shards are named ``<name>_<split>_<index:06d>.bin``.
Writers write to a temporary name and rename, so a file with the final name is
always whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxgpt.errors import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
SPLITS = ("train", "val")
VALIDATION_SAMPLE = 1 << 16  # tokens checked against the vocabulary on open


class ShardError(UserError):
    """A shard file is missing, truncated, corrupt or holds out-of-vocabulary ids."""


def shard_name(name: str, split: str, index: int) -> str:
    assert split in SPLITS, split
    return f"{name}_{split}_{index:06d}.bin"


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> Path:
    """Writes ``tokens`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a shard holds a 1-D token array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ValueError("token ids must fit in uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def open_shard(path: str | os.PathLike, vocab_size: int | None = 50257) -> np.ndarray:
    """Memory-maps a shard's tokens after checking its header, size and (unless vocab_size is None) a sample of ids."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC})")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(
            f"{path}: corrupt or truncated shard: header says {num_tokens} tokens "
            f"({expected} bytes) but the file has {size} bytes; prepare the data again"
        )
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if num_tokens and vocab_size is not None:
        step = max(1, num_tokens // VALIDATION_SAMPLE)
        sample_max = int(tokens[::step].max())
        if sample_max >= vocab_size:
            raise ShardError(f"{path}: token id {sample_max} is outside the vocabulary (size {vocab_size})")
    return tokens


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The complete shards of one split, in order; temporary files are never listed."""
    assert split in SPLITS, split
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(
            f"data directory {data_dir} does not exist; prepare it first, e.g. "
            f"python -m jaxgpt.data.prepare --input ../shared/data/tinyshakespeare.txt --out_dir {data_dir}"
        )
    shards = sorted(p for p in data_dir.glob(f"*_{split}_*.bin"))
    if not shards:
        raise ShardError(
            f"no '{split}' shards (*_{split}_*.bin) in {data_dir}; run python -m jaxgpt.data.prepare first"
        )
    return shards
