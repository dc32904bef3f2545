"""The compiled training and evaluation steps.

The hot step is one ``jax.jit`` over plain pytrees (a flat parameter dict and the
optax state) with explicit input/output shardings and the state donated; the
model is merged from the parameters inside the trace. Flax's performance guide
recommends this over ``nnx.jit``, which walks the object graph in Python on every
call (``bench/bench_train.py`` measures the difference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxgpt.errors import UserError
from jaxgpt.losses import model_loss, model_weighted_nll
from jaxgpt.model import GPT
from jaxgpt.params import ParamCodec, Params
from jaxgpt.sharding import accumulated_batch_sharding, gather_weights, on_mesh, replicated
from jaxgpt.train_state import TrainState

# "inputs", "targets": int32 [grad_accum, batch, block_size]; chat data adds float32 "weights" (the loss mask);
# other objectives' batches hold what they need, every array [grad_accum, batch, ...]
Batch = dict[str, jax.Array]


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


class Objective(Protocol):
    """What a step minimises (default :class:`NextToken`; DPO and GRPO in ``jaxgpt.rl``)."""

    def scale(self, batch: Batch) -> jax.Array | float:
        """1 / the step's normaliser: the step's loss is the sum of its micro-batches' losses times this."""
        ...

    def loss(
        self, model: GPT, micro: Batch, key: jax.Array | None, reference: GPT | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """A micro-batch's loss and extra metrics, each scaled by ``scale`` and summed over the step's micro-batches."""
        ...


class NextToken:
    """Next-token cross-entropy: the mean over the step's tokens, or with ``weights`` (chat data) over every
    weighted token of every micro-batch (1 / the step's total weight), not a mean of micro-batch means."""

    def scale(self, batch: Batch) -> jax.Array | float:
        if "inputs" not in batch:
            raise UserError("these are preference pairs: train on them with --preset dpo (or --objective dpo)")
        weights = batch.get("weights")  # pretraining: every micro-batch has as many targets
        return 1.0 / batch["inputs"].shape[0] if weights is None else 1.0 / jnp.maximum(weights.sum(), 1.0)

    def loss(self, model, micro, key, reference):
        inputs, targets, weights = micro["inputs"], micro["targets"], micro.get("weights")
        assert inputs.shape == targets.shape, (inputs.shape, targets.shape)
        if weights is None:
            return model_loss(model, inputs, targets, key), {}
        return model_weighted_nll(model, inputs, targets, weights, key), {}


def step_model(codec: ParamCodec, params: Params) -> GPT:
    """The model of ``params`` inside a step: on the step's mesh (on_mesh), FSDP's weights are gathered first."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        params = gather_weights(params, codec.shardings(mesh))
    return codec.to_model(params)


def make_train_step(
    codec: ParamCodec, tx: optax.GradientTransformation, schedule: optax.Schedule, objective: Objective | None = None
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step over ``grad_accum`` micro-batches (the gradient of their summed, scaled losses), skipping
    non-finite updates. ``reference`` (DPO's and GRPO's frozen weights) is passed to the objective as a model."""
    use_dropout = codec.config.dropout > 0
    objective = NextToken() if objective is None else objective

    def train_step(
        state: TrainState, batch: Batch, reference: Params | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        assert all(x.ndim >= 2 for x in batch.values()), {k: x.shape for k, x in batch.items()}
        accum = next(iter(batch.values())).shape[0]
        scale = objective.scale(batch)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def scaled_loss(params, micro, key):
            ref = None if reference is None else step_model(codec, jax.lax.stop_gradient(reference))
            loss, extra = objective.loss(step_model(codec, params), micro, key, ref)
            return loss * scale, jax.tree.map(lambda x: x * scale, extra)

        grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

        def micro_step(carry, xs):
            grad_sum, loss_sum, extra_sum = carry
            micro, index = xs
            key = jax.random.fold_in(step_key, index) if use_dropout else None
            (loss, extra), grads = grad_fn(state.params, micro, key)
            return (
                jax.tree.map(jnp.add, grad_sum, grads),
                loss_sum + loss,
                jax.tree.map(jnp.add, extra_sum, extra),
            ), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        micro0 = jax.tree.map(lambda x: x[0], batch)
        extra_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, micro0, None)[0][1])
        (grad_sum, loss, extra), _ = jax.lax.scan(micro_step, (zeros, 0.0, extra_zeros), (batch, jnp.arange(accum)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grad_sum, state.params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        bad = jnp.where(~finite & (state.first_bad_step < 0), state.step, state.first_bad_step)
        new_state = TrainState(
            state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), bad, state.rng
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **extra}
        return new_state, metrics

    return train_step


def jit_train_step(
    step_fn: Callable, state_shardings: TrainState, mesh: Mesh, reference: Params | None = None
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The compiled step; a ``reference`` (sharded like the parameters, never donated) is passed to every call."""
    in_shardings = (state_shardings, accumulated_batch_sharding(mesh))
    in_shardings += () if reference is None else (state_shardings.params,)
    jitted = jax.jit(
        on_mesh(step_fn, mesh),
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    return jitted if reference is None else lambda state, batch: jitted(state, batch, reference)
