"""The compiled train step: :func:`build_step` is what ``train.py`` runs and ``python -m jaxgpt.plan`` compiles.

The hot step is one ``jax.jit`` over plain pytrees (a flat parameter dict and the
optax state) with explicit input/output shardings and the state donated; the
model is merged from the parameters inside the trace. Flax's performance guide
recommends this over ``nnx.jit``, which walks the object graph in Python on every
call (``bench/bench_train.py`` measures the difference). The platform and mesh reach
the model and loss as a :class:`~jaxgpt.core.platform.Runtime`, decided here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxgpt.checkpoints.state import TrainState, init_train_state
from jaxgpt.core.errors import UserError
from jaxgpt.core.platform import Runtime, local_runtime
from jaxgpt.core.sharding import accumulated_batch_sharding, gather_weights, replicated
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT, non_embedding_params
from jaxgpt.model.losses import model_loss, model_weighted_nll
from jaxgpt.model.params import ParamCodec, Params
from jaxgpt.train import metrics
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.optim import optimizer_from_config

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
        self, model: GPT, micro: Batch, key: jax.Array | None, reference: GPT | None, runtime: Runtime
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

    def loss(self, model, micro, key, reference, runtime):
        inputs, targets, weights = micro["inputs"], micro["targets"], micro.get("weights")
        assert inputs.shape == targets.shape, (inputs.shape, targets.shape)
        if weights is None:
            return model_loss(model, inputs, targets, key, runtime), {}
        return model_weighted_nll(model, inputs, targets, weights, key, runtime), {}


def step_model(codec: ParamCodec, params: Params, runtime: Runtime, fsdp: bool) -> GPT:
    """The model of ``params`` inside a step; FSDP's weights are gathered where they are used (else XLA gathers
    the activations)."""
    if fsdp:
        params = gather_weights(params, codec.shardings(runtime.mesh))
    return codec.to_model(params)


def make_train_step(
    codec: ParamCodec,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    runtime: Runtime | None = None,
    fsdp: bool = False,
    objective: Objective | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step over ``grad_accum`` micro-batches (the gradient of their summed, scaled losses), skipping
    non-finite updates; ``runtime`` defaults to this machine's backend on one device. A third argument,
    ``reference`` (DPO's and GRPO's frozen weights), is passed to the ``objective`` as a model."""
    runtime = runtime or local_runtime()
    use_dropout = codec.config.dropout > 0
    assert runtime.mesh is not None or not fsdp, "FSDP needs the step's mesh"
    objective = NextToken() if objective is None else objective

    def train_step(
        state: TrainState, batch: Batch, reference: Params | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        assert all(x.ndim >= 2 for x in batch.values()), {k: x.shape for k, x in batch.items()}
        accum = next(iter(batch.values())).shape[0]
        scale = objective.scale(batch)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def scaled_loss(params, micro, key):
            ref = None if reference is None else step_model(codec, jax.lax.stop_gradient(reference), runtime, fsdp)
            loss, extra = objective.loss(step_model(codec, params, runtime, fsdp), micro, key, ref, runtime)
            return loss * scale, jax.tree.map(lambda x: x * scale, extra)

        grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

        def micro_step(carry, xs):
            grad_sum, loss_sum, extra_sum = carry
            micro, index = xs
            key = jax.random.fold_in(step_key, index) if use_dropout else None
            (loss, extra), grads = grad_fn(state.params, micro, key)
            sums = (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, jax.tree.map(jnp.add, extra_sum, extra))
            return sums, None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        micro0 = jax.tree.map(lambda x: x[0], batch)
        extra_shapes = jax.eval_shape(grad_fn, state.params, micro0, None)[0][1]
        extra_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), extra_shapes)
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


def jit_train_step(step_fn: Callable, state_shardings: TrainState, mesh: Mesh, reference: bool = False) -> Callable:
    """``step_fn`` compiled with explicit shardings, the state donated (updated in place); with ``reference``
    it takes the frozen weights third, sharded like the parameters and never donated."""
    in_shardings = (state_shardings, accumulated_batch_sharding(mesh))
    return jax.jit(
        step_fn,
        in_shardings=in_shardings + ((state_shardings.params,) if reference else ()),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The compiled step and what it is made of; the trainer runs ``fn``, a compile plan lowers it."""

    codec: ParamCodec
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    runtime: Runtime
    fn: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]

    @property
    def flops_per_token(self) -> float:
        """Model FLOPs per token (6N + attention, the MFU numerator)."""
        model = self.codec.abstract_model()
        return metrics.flops_per_token(self.codec.config, non_embedding_params(model))

    def abstract_state(self, seed: int) -> TrainState:
        """The state's shapes and dtypes (nothing allocated): what a restore or a compile plan targets."""
        return jax.eval_shape(lambda p: init_train_state(p, self.tx, seed), self.codec.abstract)

    def with_reference(self, reference: Params) -> TrainStep:
        """The step of an objective with its frozen weights bound: ``fn(state, batch)`` as any other step."""
        fn = self.fn
        return dataclasses.replace(self, fn=lambda state, batch: fn(state, batch, reference))

    def init_state(self, params: Params, seed: int) -> TrainState:
        """Step 0 from ``params`` (already placed), created directly in the state's shardings."""
        return jax.jit(lambda p: init_train_state(p, self.tx, seed), out_shardings=self.shardings)(params)


def build_step(
    model_config: GPTConfig,
    cfg: TrainConfig,
    mesh: Mesh,
    platform: str | None = None,
    objective: Objective | None = None,
    reference: bool | None = None,
) -> TrainStep:
    """The one train step of a run: optimizer, shardings and compiled function for ``model_config`` on
    ``mesh``, compiled for ``platform`` (default: this machine's backend; a compile plan names its target).
    An ``objective`` (``jaxgpt.rl``) replaces the next-token loss; its frozen weights (``reference``, default:
    with an objective) are bound with ``with_reference``."""
    codec = ParamCodec(model_config)
    schedule, tx = optimizer_from_config(cfg)
    shardings = train_state_shardings(codec, tx, mesh, cfg.fsdp)
    runtime = Runtime(platform or jax.default_backend(), mesh)
    step_fn = make_train_step(codec, tx, schedule, runtime, cfg.fsdp, objective)
    fn = jit_train_step(step_fn, shardings, mesh, reference=objective is not None if reference is None else reference)
    return TrainStep(codec, tx, schedule, shardings, runtime, fn)
