"""The compiled training and evaluation steps.

The hot step is one ``jax.jit`` over plain pytrees (a flat parameter dict and the
optax state) with explicit input/output shardings and the state donated; the
model is merged from the parameters inside the trace. Flax's performance guide
recommends this over ``nnx.jit``, which walks the object graph in Python on every
call (``bench/bench_train.py`` measures the difference).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxgpt.losses import cross_entropy
from jaxgpt.params import ParamCodec, Params
from jaxgpt.sharding import accumulated_batch_sharding, replicated
from jaxgpt.train_state import TrainState

Batch = dict[str, jax.Array]  # "inputs", "targets": int32 [grad_accum, batch, block_size]


def train_state_shardings(codec: ParamCodec, tx: optax.GradientTransformation, mesh: Mesh, fsdp: bool) -> TrainState:
    """Explicit shardings for every leaf: optimizer moments are sharded exactly like their parameters.

    A moment is found by its key: every per-parameter tree in an optax state is a dict keyed by the
    flat parameter names, whole (AdamW) or a subset (Muon's partition into a Muon and an AdamW group,
    which ``optax.tree_map_params`` cannot see through). Counts and other scalars are replicated.
    """
    param_shardings = codec.shardings(mesh, fsdp)
    abstract_opt = jax.eval_shape(tx.init, codec.abstract)

    def sharding(path: tuple, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        name = getattr(path[-1], "key", None) if path else None
        if name in param_shardings and leaf.shape == codec.abstract[name].shape:
            return param_shardings[name]
        return replicated(mesh)

    opt_shardings = jax.tree_util.tree_map_with_path(sharding, abstract_opt)
    scalar = replicated(mesh)
    return TrainState(scalar, param_shardings, opt_shardings, scalar, scalar)


def loss_fn(codec: ParamCodec, params: Params, inputs: jax.Array, targets: jax.Array, key: jax.Array | None):
    model = codec.to_model(params)
    return cross_entropy(model(inputs, dropout_key=key), targets)


def make_train_step(
    codec: ParamCodec, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step over ``grad_accum`` micro-batches (their mean gradient), skipping non-finite updates."""
    use_dropout = codec.config.dropout > 0

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        inputs, targets = batch["inputs"], batch["targets"]
        assert inputs.ndim == 3 and inputs.shape == targets.shape, (inputs.shape, targets.shape)
        accum = inputs.shape[0]
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(lambda p, x, y, k: loss_fn(codec, p, x, y, k))

        def micro_step(carry, xs):
            grad_sum, loss_sum = carry
            x, y, index = xs
            key = jax.random.fold_in(step_key, index) if use_dropout else None
            loss, grads = grad_fn(state.params, x, y, key)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grad_sum, loss_sum), _ = jax.lax.scan(micro_step, (zeros, 0.0), (inputs, targets, jnp.arange(accum)))
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, state.params)
        loss = loss_sum / accum
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        bad = jnp.where(~finite & (state.first_bad_step < 0), state.step, state.first_bad_step)
        new_state = TrainState(
            state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), bad, state.rng
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
        return new_state, metrics

    return train_step


def jit_train_step(step_fn: Callable, state_shardings: TrainState, mesh: Mesh) -> Callable:
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, accumulated_batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
