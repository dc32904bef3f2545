"""Shard files: round trip, and every kind of damage rejected with the file's name."""

from pathlib import Path

import numpy as np
import pytest

from jaxgpt.core.errors import UserError
from jaxgpt.data import shards
from jaxgpt.data.pipeline import DataConfig, make_train_iterator


def test_round_trip_and_header(tmp_path: Path) -> None:
    tokens = np.array([0, 1, 50256, 1234], dtype=np.uint16)
    path = shards.write_shard(tmp_path / shards.shard_name("x", "train", 0), tokens)
    assert path.name == "x_train_000000.bin"
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [shards.MAGIC, shards.VERSION, 4]
    np.testing.assert_array_equal(shards.open_shard(path), tokens)
    assert not list(tmp_path.glob("*.tmp"))


def write(tmp_path: Path, tokens: list[int], name: str = "x_train_000000.bin") -> Path:
    return shards.write_shard(tmp_path / name, np.array(tokens, dtype=np.uint16))


def test_bad_magic_is_rejected_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, [1, 2, 3])
    data = bytearray(path.read_bytes())
    data[0:4] = np.int32(12345).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(shards.ShardError, match=r"x_train_000000\.bin.*magic"):
        shards.open_shard(path)


@pytest.mark.parametrize("cut", [4, 1024 + 2])  # inside the header, inside the tokens
def test_truncated_shard_is_rejected_by_name(tmp_path: Path, cut: int) -> None:
    path = write(tmp_path, list(range(10)))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(shards.ShardError, match=r"x_train_000000\.bin.*truncated"):
        shards.open_shard(path)


def test_out_of_vocabulary_token_is_rejected_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, [5, 60000, 7])
    with pytest.raises(shards.ShardError, match=r"x_train_000000\.bin.*60000.*vocabulary"):
        shards.open_shard(path)


def test_list_shards_skips_temporary_files_and_explains_empty_dirs(tmp_path: Path) -> None:
    write(tmp_path, [1, 2], "x_train_000001.bin")
    write(tmp_path, [1, 2], "x_train_000000.bin")
    (tmp_path / "x_train_000002.bin.tmp").write_bytes(b"half a shard")
    assert [p.name for p in shards.list_shards(tmp_path, "train")] == ["x_train_000000.bin", "x_train_000001.bin"]
    with pytest.raises(UserError, match=r"jaxgpt\.data\.prepare"):
        shards.list_shards(tmp_path, "val")
    with pytest.raises(UserError, match="prepare"):
        shards.list_shards(tmp_path / "missing", "train")


def test_pipeline_refuses_an_empty_dir_and_a_corrupt_shard(tmp_path: Path) -> None:
    config = DataConfig(data_dir=str(tmp_path), block_size=4, global_batch_size=2, data_workers=0)
    with pytest.raises(UserError, match=r"jaxgpt\.data\.prepare"):
        make_train_iterator(config, process_index=0, process_count=1)
    write(tmp_path, list(range(100)))
    path = write(tmp_path, list(range(100)), "x_train_000001.bin")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(shards.ShardError, match=r"x_train_000001\.bin"):
        make_train_iterator(config, process_index=0, process_count=1)


def test_label_shards_round_trip_and_must_match_their_token_shard(tmp_path: Path) -> None:
    tokens = write(tmp_path, [50256, 5, 6, 50256, 7])
    labels = np.array([shards.START, 0, shards.LOSS, shards.LOSS | shards.START, shards.LOSS], np.uint8)
    path = shards.write_labels(tokens, labels)
    assert path.name == "x_train_000000.mask" and shards.list_shards(tmp_path, "train") == [tokens]
    np.testing.assert_array_equal(shards.open_labels(tokens, 5), labels)
    assert shards.has_labels([tokens])
    with pytest.raises(shards.ShardError, match=r"x_train_000000\.mask.*4 labels for the 5 tokens"):
        shards.write_labels(tokens, labels[:4])
        shards.open_labels(tokens, 5)
    with pytest.raises(shards.ShardError, match=r"x_train_000000\.mask: not a token shard"):
        shards.open_shard(path)
    other = write(tmp_path, [1, 2], name="x_train_000001.bin")
    with pytest.raises(shards.ShardError, match=r"x_train_000001\.mask is missing"):
        shards.has_labels([tokens, other])
    assert not shards.has_labels([other])
