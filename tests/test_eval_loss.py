"""Validation loss: every token scored once, equal to transformers' cross-entropy, the same on any mesh."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from eval_utils import TinyGPT2, hf_token_log_probs, tiny_gpt2

from jaxgpt.checkpoints.loading import load_model
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import make_mesh, shard_model
from jaxgpt.data.shards import open_shard, write_shard
from jaxgpt.eval import evaluate_loss

BLOCK = 32
SHARD_LENGTHS = (150, 123)  # 272 targets: 8 full windows of 32 and one of 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyGPT2:
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i, n in enumerate(SHARD_LENGTHS):
        write_shard(directory / f"test_val_{i:06d}.bin", rng.integers(0, 50257, n))
    write_shard(directory / "test_train_000000.bin", rng.integers(0, 50257, 64))  # another split: ignored
    return directory


def val_tokens(val_dir) -> np.ndarray:
    return np.concatenate([open_shard(p) for p in sorted(val_dir.glob("*_val_*.bin"))]).astype(np.int64)


def reference_loss(model_dir, tokens: np.ndarray, block: int) -> tuple[float, int]:
    """Mean cross-entropy from transformers over windows of block + 1 tokens, stride block."""
    windows = [tokens[i : i + block + 1].tolist() for i in range(0, len(tokens) - 1, block)]
    log_probs = np.concatenate(hf_token_log_probs(model_dir, windows))
    return -log_probs.mean(), len(log_probs)


def test_val_loss_equals_transformers_cross_entropy(tiny, val_dir):
    tokens = val_tokens(val_dir)
    expected, count = reference_loss(tiny.dir, tokens, BLOCK)
    assert count == len(tokens) - 1 == sum(SHARD_LENGTHS) - 1  # every token but the first, once
    # 9 windows in batches of 4: the last batch holds one short window and three padding rows
    result = evaluate_loss(tiny.model, val_dir, batch_size=4, block_size=BLOCK)
    assert result["num_tokens"] == count
    np.testing.assert_allclose(result["val_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], math.exp(expected), rtol=1e-5)


def test_max_tokens_scores_only_the_first_tokens(tiny, val_dir):
    expected, count = reference_loss(tiny.dir, val_tokens(val_dir)[:101], BLOCK)
    result = evaluate_loss(tiny.model, val_dir, batch_size=4, block_size=BLOCK, max_tokens=100)
    assert result["num_tokens"] == count == 100
    np.testing.assert_allclose(result["val_loss"], expected, rtol=1e-5)
    everything = evaluate_loss(tiny.model, val_dir, batch_size=4, block_size=BLOCK, max_tokens=10**9)
    assert everything["num_tokens"] == sum(SHARD_LENGTHS) - 1


def test_padding_rows_do_not_count(tiny, val_dir):
    """Different batch sizes pad the last batch differently; the loss must not move."""
    a = evaluate_loss(tiny.model, val_dir, batch_size=4, block_size=BLOCK)
    b = evaluate_loss(tiny.model, val_dir, batch_size=7, block_size=BLOCK)
    assert a["num_tokens"] == b["num_tokens"]
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-6)


def test_sharded_mesh_gives_the_same_loss(tiny, val_dir):
    assert jax.device_count() == 8, "conftest should provide 8 CPU devices"
    single = make_mesh("1x1", jax.devices()[:1])
    expected = evaluate_loss(load_model(tiny.dir), val_dir, batch_size=8, block_size=BLOCK, mesh=single)
    mesh = make_mesh("4x2")
    # a vocabulary padded to 50304 splits over the model axis: tensor parallelism of the head too
    sharded = shard_model(load_model(tiny.dir, pad_vocab_multiple=64), mesh)
    result = evaluate_loss(sharded, val_dir, batch_size=8, block_size=BLOCK, mesh=mesh)
    assert result["num_tokens"] == expected["num_tokens"]
    np.testing.assert_allclose(result["val_loss"], expected["val_loss"], rtol=1e-5)


def test_bad_arguments_are_user_errors(tiny, val_dir, tmp_path):
    with pytest.raises(UserError, match="block_size"):
        evaluate_loss(tiny.model, val_dir, batch_size=4, block_size=129)
    with pytest.raises(UserError, match="not divisible"):
        evaluate_loss(tiny.model, val_dir, batch_size=6, block_size=BLOCK, mesh=make_mesh("4x2"))
    with pytest.raises(UserError, match="no 'val' shards"):
        evaluate_loss(tiny.model, tmp_path, batch_size=4)
    with pytest.raises(UserError, match="max_tokens"):
        evaluate_loss(tiny.model, val_dir, batch_size=4, max_tokens=0)
