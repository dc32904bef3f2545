"""What a training run carries from step to step, and what a checkpoint stores.

Kept apart from the step (``jaxgpt.train.step``) so that reading a checkpoint pulls in no optimizer code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt.model.params import Params


class TrainState(NamedTuple):
    """Everything a train step reads and writes, checkpointed whole, so that a resumed run goes on where it stopped."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params
    opt_state: Any  # the optax optimizer's state, sharded like the parameters
    first_bad_step: jax.Array  # int32 scalar: the first step with a non-finite loss or gradient, -1 if none
    rng: jax.Array  # uint32 key data: dropout keys are folded from it with the step


def init_train_state(params: Params, tx: Any, seed: int) -> TrainState:
    """Step 0 of a run: ``tx`` is the optax ``GradientTransformation`` whose state is initialised."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        first_bad_step=jnp.full((), -1, jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
