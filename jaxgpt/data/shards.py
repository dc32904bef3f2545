"""Token shards on disk: llm.c's format, so shards from either project work in both.

A shard is a 1024-byte header of 256 little-endian int32 (``[0]`` magic 20240520,
``[1]`` version 1, ``[2]`` number of tokens, the rest zero) followed by the tokens
as little-endian uint16. Shards are named ``<name>_<split>_<index:06d>.bin``.
Writers write to a temporary name and rename, so a file with the final name is
always whole.

Chat data (``prepare --format chat``) adds a LABEL shard beside each token shard:
the same name with ``.mask`` for ``.bin``, the same 1024-byte header with magic
20240601 and the token count, then one uint8 per token. Bit 0 (:data:`LOSS`) is set
where that token is a training target (an assistant's token, see ``jaxgpt.chat``),
bit 1 (:data:`START`) on the first token of each conversation. Token shards stay
llm.c's, so any tool that reads them still can.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxgpt.core.errors import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
LABEL_MAGIC = 20240601
LABEL_DTYPE = np.dtype("u1")
LABEL_SUFFIX = ".mask"
LOSS = 1  # label bit: the token is a training target
START = 2  # label bit: the token starts a conversation
SPLITS = ("train", "val")
VALIDATION_SAMPLE = 1 << 16  # tokens checked against the vocabulary on open


class ShardError(UserError):
    """A shard file is missing, truncated, corrupt or holds out-of-vocabulary ids."""


def shard_name(name: str, split: str, index: int) -> str:
    """The file name of a split's shard ``index``: ``<name>_<split>_<index:06d>.bin``, which sorts in order."""
    assert split in SPLITS, split
    return f"{name}_{split}_{index:06d}.bin"


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> Path:
    """Writes ``tokens`` atomically (temporary file, fsync, rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ValueError("token ids must fit in uint16 (0..65535)")
    return _write(Path(path), MAGIC, tokens.astype(TOKEN_DTYPE, copy=False))


def _write(path: Path, magic: int, values: np.ndarray) -> Path:
    if values.ndim != 1:
        raise ValueError(f"a shard holds a 1-D array, got shape {values.shape}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, VERSION, values.size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(values.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def open_shard(path: str | os.PathLike, vocab_size: int | None = 50257) -> np.ndarray:
    """Memory-maps a shard's tokens after checking its header, size and (unless vocab_size is None) a sample of ids."""
    path = Path(path)
    tokens = _open(path, MAGIC, TOKEN_DTYPE, "token shard")
    if len(tokens) and vocab_size is not None:
        step = max(1, len(tokens) // VALIDATION_SAMPLE)
        sample_max = int(tokens[::step].max())
        if sample_max >= vocab_size:
            raise ShardError(f"{path}: token id {sample_max} is outside the vocabulary (size {vocab_size})")
    return tokens


def _open(path: Path, magic: int, dtype: np.dtype, kind: str) -> np.ndarray:
    """Memory-maps the values of a shard after checking its header and size."""
    if not path.is_file():
        raise ShardError(f"{path}: {kind} file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != magic:
        raise ShardError(f"{path}: not a {kind} (magic {header[0]}, expected {magic})")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        raise ShardError(
            f"{path}: corrupt or truncated shard: header says {count} values "
            f"({expected} bytes) but the file has {size} bytes; prepare the data again"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def label_path(token_shard: str | os.PathLike) -> Path:
    """The label shard that belongs to a token shard: ``x_train_000000.bin`` -> ``x_train_000000.mask``."""
    return Path(token_shard).with_suffix(LABEL_SUFFIX)


def write_labels(token_shard: str | os.PathLike, labels: np.ndarray) -> Path:
    """Writes the label shard of ``token_shard`` (uint8 :data:`LOSS` | :data:`START` bits per token)."""
    labels = np.asarray(labels)
    assert labels.dtype == LABEL_DTYPE and labels.max(initial=0) <= LOSS | START, labels.dtype
    return _write(label_path(token_shard), LABEL_MAGIC, labels)


def open_labels(token_shard: str | os.PathLike, num_tokens: int) -> np.ndarray:
    """Memory-maps the label shard of ``token_shard``, checked to hold one label per token."""
    path = label_path(token_shard)
    labels = _open(path, LABEL_MAGIC, LABEL_DTYPE, "label shard")
    if len(labels) != num_tokens:
        raise ShardError(f"{path}: {len(labels)} labels for the {num_tokens} tokens of its shard; prepare again")
    return labels


def has_labels(token_shards: list[Path]) -> bool:
    """Whether the shards are chat data (every one has its label shard); a partial set is an error."""
    present = [label_path(p).is_file() for p in token_shards]
    if any(present) and not all(present):
        missing = token_shards[present.index(False)]
        raise ShardError(f"{label_path(missing)} is missing while other shards have labels; prepare the data again")
    return all(present) and bool(present)


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
