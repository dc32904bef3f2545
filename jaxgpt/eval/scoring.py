"""The one compiled function every evaluation runs: per-row log-likelihood of weighted targets.

Validation loss, HellaSwag and lm-evaluation-harness differ only in which target tokens count,
so all hand :class:`RowScorer` fixed-shape batches of ``inputs``, ``targets`` and ``weights``
[B, T] and get back, for each row, the sum of ``weights * log p(target)`` (and, if asked, whether
every weighted target is the model's argmax). The jitted function lives at module level with the
model's graph as a static argument: jax caches one executable per (graph, batch shape), so
training can evaluate every few hundred steps without compiling again. :func:`score_rows` scores
token rows of any length with few shapes: sorted by length, padded to a few length buckets.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxgpt.core.distributed import to_host
from jaxgpt.core.sharding import batch_sharding, check_batch_divisible
from jaxgpt.model.gpt import GPT
from jaxgpt.model.losses import model_weighted_nll, weighted_nll

SMALLEST_BUCKET = 64


class RowScores(NamedTuple):
    """Per row: the summed log-likelihood of its scored tokens and whether each is the model's argmax."""

    log_likelihood: np.ndarray  # float64 [N]
    is_greedy: np.ndarray  # bool [N]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _row_scores(
    graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, targets: jax.Array, weights: jax.Array, greedy: bool
) -> jax.Array | tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, state)
    if not greedy:
        return -model_weighted_nll(model, inputs, targets, weights, axis=-1)
    logits = model(inputs)  # lm-eval's is_greedy needs every position's argmax: the plain head
    sums = -weighted_nll(logits, targets, weights, axis=-1)
    return sums, jnp.all((jnp.argmax(logits, axis=-1) == targets) | (weights == 0), axis=-1)


class RowScorer:
    """Scores token batches with one model; the batch is split over the mesh's ``data`` axis.

    The model is used where it already lives (the caller shards it, e.g. with
    ``jaxgpt.core.sharding.shard_model``): evaluation must not move a training model's parameters.
    """

    def __init__(self, model: GPT, mesh: Mesh | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh
        self.block_size = model.config.block_size

    def check_rows(self, rows: int, what: str) -> None:
        """A user error, raised before any work, if ``rows`` does not split over the data axis."""
        if self.mesh is not None:
            check_batch_divisible(rows, self.mesh, what)

    def __call__(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """float64 [B]: sum over each row of ``weights * log p(target | inputs up to it)``."""
        return np.asarray(self._run(inputs, targets, weights, greedy=False), dtype=np.float64)

    def with_greedy(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> RowScores:
        """The sums of ``__call__`` and, per row, whether every weighted target is the argmax token."""
        sums, is_greedy = self._run(inputs, targets, weights, greedy=True)
        return RowScores(np.asarray(sums, dtype=np.float64), np.asarray(is_greedy))

    def _run(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray, greedy: bool):
        assert inputs.ndim == 2 and inputs.shape == targets.shape == weights.shape, (inputs.shape, targets.shape)
        batch = (inputs.astype(np.int32), targets.astype(np.int32), weights.astype(np.float32))
        if self.mesh is not None:
            batch = jax.device_put(batch, batch_sharding(self.mesh))
        return to_host(_row_scores(self.graphdef, self.state, *batch, greedy))  # the rows of other processes too


def pack_rows(
    rows: Sequence[Sequence[int]], scored: Sequence[int], n_rows: int, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-shape ``inputs``, ``targets``, ``weights`` [n_rows, length] from token rows of any length.

    Row ``r`` reads ``rows[r][:-1]`` and predicts ``rows[r][1:]``; its last ``scored[r]`` targets
    get weight 1. Missing rows and the positions past a row's end are padding: token 0, weight 0.
    """
    assert len(rows) == len(scored) <= n_rows, (len(rows), len(scored), n_rows)
    inputs = np.zeros((n_rows, length), np.int32)
    targets = np.zeros((n_rows, length), np.int32)
    weights = np.zeros((n_rows, length), np.float32)
    for r, (row, n_scored) in enumerate(zip(rows, scored, strict=True)):
        n = len(row) - 1
        assert 0 <= n_scored <= n <= length, (n_scored, n, length)
        inputs[r, :n], targets[r, :n] = row[:-1], row[1:]
        weights[r, n - n_scored : n] = 1.0
    return inputs, targets, weights


def length_buckets(block_size: int) -> list[int]:
    """The padded input lengths: 64, 96, 128, 192, 256, ... below block_size, then block_size.

    Steps of 1.5x and 2x alternate, so padding wastes at most a third of a batch's compute
    while a run compiles only a few shapes (HellaSwag's rows fit in 64 to 256 tokens).
    """
    buckets, length = [], SMALLEST_BUCKET
    while length < block_size:
        buckets += [length, length * 3 // 2]
        length *= 2
    return [b for b in buckets if b < block_size] + [block_size]


def score_rows(
    scorer: RowScorer,
    rows: Sequence[Sequence[int]],
    scored: Sequence[int],
    batch_rows: int,
    *,
    desc: str = "scoring",
    progress: bool = False,
) -> RowScores:
    """Scores token rows of any length up to ``block_size + 1`` (see :func:`pack_rows` for ``scored``).

    Longest rows first (a too-large batch fails at once), ``batch_rows`` at a time, each batch
    padded to the first :func:`length_buckets` length that holds it and to ``batch_rows`` rows:
    a run compiles at most one shape per bucket.
    """
    assert len(rows) == len(scored), (len(rows), len(scored))
    buckets = length_buckets(scorer.block_size)
    lengths = np.asarray([len(row) - 1 for row in rows], np.int64)
    assert lengths.max(initial=1) <= scorer.block_size and lengths.min(initial=1) >= 1, (lengths.min(), lengths.max())
    order = np.argsort(-lengths, kind="stable")
    sums, is_greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    bar = tqdm(total=len(rows), desc=desc, unit="row", disable=None if progress else True)
    for first in range(0, len(rows), batch_rows):
        batch = order[first : first + batch_rows]
        length = next(b for b in buckets if b >= lengths[batch].max())
        packed = pack_rows([rows[i] for i in batch], [scored[i] for i in batch], batch_rows, length)
        result = scorer.with_greedy(*packed)
        sums[batch], is_greedy[batch] = result.log_likelihood[: len(batch)], result.is_greedy[: len(batch)]
        bar.update(len(batch))
    bar.close()
    return RowScores(sums, is_greedy)
