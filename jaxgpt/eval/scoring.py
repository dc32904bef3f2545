"""The one compiled function both evaluations run: per-row log-likelihood of weighted targets.

Validation loss and HellaSwag differ only in which target tokens count, so both hand
:class:`RowScorer` fixed-shape batches of ``inputs``, ``targets`` and ``weights`` [B, T]
and get back, for each row, the sum of ``weights * log p(target)``. The jitted function
lives at module level with the model's graph as a static argument: jax caches one
executable per (graph, batch shape), so training can evaluate every few hundred steps
without compiling again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxgpt.distributed import to_host
from jaxgpt.losses import token_log_probs
from jaxgpt.model import GPT
from jaxgpt.sharding import batch_sharding, check_batch_divisible


@functools.partial(jax.jit, static_argnums=0)
def _row_log_likelihood(
    graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, targets: jax.Array, weights: jax.Array
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return (token_log_probs(model(inputs), targets) * weights).sum(axis=-1)


class RowScorer:
    """Scores token batches with one model; the batch is split over the mesh's ``data`` axis.

    The model is used where it already lives (the caller shards it, e.g. with
    ``jaxgpt.sharding.shard_model``): evaluation must not move a training model's parameters.
    """

    def __init__(self, model: GPT, mesh: Mesh | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh

    def check_rows(self, rows: int, what: str) -> None:
        """A user error, raised before any work, if ``rows`` does not split over the data axis."""
        if self.mesh is not None:
            check_batch_divisible(rows, self.mesh, what)

    def __call__(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """float64 [B]: sum over each row of ``weights * log p(target | inputs up to it)``."""
        assert inputs.ndim == 2 and inputs.shape == targets.shape == weights.shape, (inputs.shape, targets.shape)
        batch = (inputs.astype(np.int32), targets.astype(np.int32), weights.astype(np.float32))
        if self.mesh is not None:
            batch = jax.device_put(batch, batch_sharding(self.mesh))
        row_sums = _row_log_likelihood(self.graphdef, self.state, *batch)
        return np.asarray(to_host(row_sums), dtype=np.float64)  # the rows of other processes too


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
