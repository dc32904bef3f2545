"""The Grain pipeline: windows, shuffling, process split, resumable state, eval batches, global arrays.

The test shards hold token k at position k (fewer than 50257 tokens), so every row
tells which window it is: window id = inputs[row, 0] // T.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.core.errors import UserError
from jaxgpt.data import shards
from jaxgpt.data.pipeline import (
    DataConfig,
    iterator_state,
    make_train_iterator,
    restore_iterator,
)

T = 16
NUM_TOKENS = 10_000
NUM_WINDOWS = (NUM_TOKENS - 1) // T  # 624
GLOBAL_BATCH = 8
STEPS_PER_EPOCH = NUM_WINDOWS // GLOBAL_BATCH  # 78


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Train: positions 0..9999 over uneven shards (one empty), so windows straddle shards; val: 0..999."""
    root = tmp_path_factory.mktemp("positions")
    bounds = [0, 3000, 3001, 3001, 7500, NUM_TOKENS]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        shards.write_shard(root / shards.shard_name("pos", "train", i), np.arange(a, b, dtype=np.uint16))
    shards.write_shard(root / shards.shard_name("pos", "val", 0), np.arange(1000, dtype=np.uint16))
    return root


def config_for(data_dir: Path, **changes) -> DataConfig:
    defaults = dict(data_dir=str(data_dir), block_size=T, global_batch_size=GLOBAL_BATCH, seed=0, data_workers=0)
    return DataConfig(**{**defaults, **changes})


def window_ids(batch: dict[str, np.ndarray]) -> list[int]:
    """Checks that each row is a whole window with next-token targets, and returns the window ids."""
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.dtype == targets.dtype == np.int32 and inputs.shape == targets.shape
    assert inputs.shape[1] == T and inputs.flags.c_contiguous
    starts = inputs[:, 0]
    assert np.all(starts % T == 0)
    np.testing.assert_array_equal(inputs, starts[:, None] + np.arange(T))
    np.testing.assert_array_equal(targets, inputs + 1)
    return (starts // T).tolist()


def take(it, n: int) -> list[list[int]]:
    return [window_ids(next(it)) for _ in range(n)]


def flat(lists: list[list[int]]) -> list[int]:
    return [x for part in lists for x in part]


def test_one_epoch_is_a_permutation_of_all_windows_and_epochs_differ(data_dir: Path) -> None:
    it = make_train_iterator(config_for(data_dir), process_index=0, process_count=1)
    epoch1 = flat(take(it, STEPS_PER_EPOCH))
    assert sorted(epoch1) == list(range(NUM_WINDOWS)) and epoch1 != sorted(epoch1)
    epoch2 = flat(take(it, STEPS_PER_EPOCH))  # 624 windows = 78 whole batches: epochs align with steps
    assert sorted(epoch2) == list(range(NUM_WINDOWS)) and epoch2 != epoch1


def test_same_seed_same_batches_other_seed_other_batches(data_dir: Path) -> None:
    def first(seed: int, workers: int) -> list[list[int]]:
        it = make_train_iterator(config_for(data_dir, seed=seed, data_workers=workers), process_count=1)
        return take(it, 5)

    assert first(0, 0) == first(0, 2)  # worker threads change nothing
    assert first(1, 0) != first(0, 0)


@pytest.mark.parametrize("count", [2, 4])
def test_processes_read_disjoint_rows_that_make_up_the_global_batch(data_dir: Path, count: int) -> None:
    whole = take(make_train_iterator(config_for(data_dir), process_index=0, process_count=1), 6)
    parts = [
        take(make_train_iterator(config_for(data_dir), process_index=p, process_count=count), 6) for p in range(count)
    ]
    for step in range(6):
        rows = [parts[p][step] for p in range(count)]
        assert all(len(r) == GLOBAL_BATCH // count for r in rows)
        assert flat(rows) == whole[step]  # process p holds rows [p*B, (p+1)*B) of the global batch
        assert len(set(flat(rows))) == GLOBAL_BATCH  # disjoint


def test_batch_size_must_divide_between_processes(data_dir: Path) -> None:
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        make_train_iterator(config_for(data_dir), process_index=0, process_count=3)
    with pytest.raises(UserError, match="process_index"):
        make_train_iterator(config_for(data_dir), process_index=2, process_count=2)
    with pytest.raises(UserError, match="block_size"):
        make_train_iterator(config_for(data_dir, block_size=NUM_TOKENS), process_count=1)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [5, STEPS_PER_EPOCH - 2])  # mid-epoch; just before an epoch boundary
def test_grain_state_resumes_exactly(data_dir: Path, workers: int, stop: int) -> None:
    config = config_for(data_dir, data_workers=workers, prefetch=4)
    reference = take(make_train_iterator(config, process_count=1), stop + 5)
    it = make_train_iterator(config, process_count=1)
    take(it, stop)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"next_index": stop}
    resumed = make_train_iterator(config, process_count=1)
    resumed.set_state(state)
    assert take(resumed, 5) == reference[stop:]


def test_saved_state_restores_with_another_process_count(data_dir: Path) -> None:
    config = config_for(data_dir)
    reference = take(make_train_iterator(config, process_count=1), STEPS_PER_EPOCH + 3)
    it = make_train_iterator(config, process_count=1)
    take(it, STEPS_PER_EPOCH - 1)
    state = json.loads(json.dumps(iterator_state(it, config, process_count=1)))
    assert state["grain"] == {"next_index": STEPS_PER_EPOCH - 1} and state["train_tokens"] == NUM_TOKENS
    restored = [restore_iterator(config, state, process_index=p, process_count=2) for p in range(2)]
    for step in range(STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH + 3):  # across the epoch boundary
        assert window_ids(next(restored[0])) + window_ids(next(restored[1])) == reference[step]


def test_restore_refuses_a_state_of_other_data_or_shape(data_dir: Path, tmp_path: Path) -> None:
    config = config_for(data_dir)
    state = iterator_state(make_train_iterator(config, process_count=1), config, process_count=1)
    for changes, what in [({"seed": 1}, "seed 0 -> 1"), ({"global_batch_size": 4}, "global_batch_size 8 -> 4")]:
        with pytest.raises(UserError, match=what):
            restore_iterator(config_for(data_dir, **changes), state, process_count=1)
    shards.write_shard(tmp_path / "other_train_000000.bin", np.arange(5000, dtype=np.uint16))
    with pytest.raises(UserError, match="train_tokens 10000 -> 5000"):
        restore_iterator(config_for(tmp_path), state, process_count=1)
    with pytest.raises(UserError, match="iterator_state"):
        restore_iterator(config, {"next_index": 3}, process_count=1)


def test_config_checks() -> None:
    with pytest.raises(UserError, match="global_batch_size"):
        DataConfig(global_batch_size=0)
    with pytest.raises(UserError, match="seed"):
        DataConfig(seed=-1)
