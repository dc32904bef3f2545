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

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxgpt.checkpoints.state import TrainState, init_train_state
from jaxgpt.core.platform import Runtime, local_runtime
from jaxgpt.core.sharding import accumulated_batch_sharding, gather_weights, replicated
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import non_embedding_params
from jaxgpt.model.losses import model_loss, model_weighted_nll
from jaxgpt.model.params import ParamCodec, Params
from jaxgpt.train import metrics
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.optim import optimizer_from_config

# "inputs", "targets": int32 [grad_accum, batch, block_size]; chat data adds float32 "weights" (the loss mask)
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


def loss_fn(
    codec: ParamCodec,
    params: Params,
    inputs: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None,
    key: jax.Array | None,
    scale: jax.Array | float,
    runtime: Runtime,
    fsdp: bool,
):
    """One micro-batch's share of the step's loss: its mean times ``scale``, or with ``weights`` their
    weighted sum times ``scale`` (1 / the step's total weight, so the step's loss is the mean over
    every weighted token of every micro-batch, not a mean of micro-batch means)."""
    if fsdp:  # FSDP's weights are gathered where they are used (else XLA gathers the activations)
        params = gather_weights(params, codec.shardings(runtime.mesh))
    model = codec.to_model(params)
    if weights is None:
        return model_loss(model, inputs, targets, key, runtime) * scale
    return model_weighted_nll(model, inputs, targets, weights, key, runtime) * scale


def make_train_step(
    codec: ParamCodec,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    runtime: Runtime | None = None,
    fsdp: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step over ``grad_accum`` micro-batches (the gradient of their mean loss), skipping
    non-finite updates; ``runtime`` defaults to this machine's backend on one device."""
    runtime = runtime or local_runtime()
    use_dropout = codec.config.dropout > 0
    assert runtime.mesh is not None or not fsdp, "FSDP needs the step's mesh"

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        inputs, targets, weights = batch["inputs"], batch["targets"], batch.get("weights")
        assert inputs.ndim == 3 and inputs.shape == targets.shape, (inputs.shape, targets.shape)
        accum = inputs.shape[0]
        # pretraining: every micro-batch has as many targets, so the mean of their means is the mean
        scale = 1.0 / accum if weights is None else 1.0 / jnp.maximum(weights.sum(), 1.0)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(lambda p, x, y, w, k: loss_fn(codec, p, x, y, w, k, scale, runtime, fsdp))

        def micro_step(carry, xs):
            grad_sum, loss_sum = carry
            x, y, w, index = xs
            key = jax.random.fold_in(step_key, index) if use_dropout else None
            loss, grads = grad_fn(state.params, x, y, w, key)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        xs = (inputs, targets, weights, jnp.arange(accum))  # weights None: nothing extra is scanned
        (grad_sum, loss), _ = jax.lax.scan(micro_step, (zeros, 0.0), xs)
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
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
        return new_state, metrics

    return train_step


def jit_train_step(step_fn: Callable, state_shardings: TrainState, mesh: Mesh) -> Callable:
    """``step_fn`` compiled with explicit shardings, the state donated (updated in place)."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, accumulated_batch_sharding(mesh)),
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

    def init_state(self, params: Params, seed: int) -> TrainState:
        """Step 0 from ``params`` (already placed), created directly in the state's shardings."""
        return jax.jit(lambda p: init_train_state(p, self.tx, seed), out_shardings=self.shardings)(params)


def build_step(model_config: GPTConfig, cfg: TrainConfig, mesh: Mesh, platform: str | None = None) -> TrainStep:
    """The one train step of a run: optimizer, shardings and compiled function for ``model_config`` on
    ``mesh``, compiled for ``platform`` (default: this machine's backend; a compile plan names its target)."""
    codec = ParamCodec(model_config)
    schedule, tx = optimizer_from_config(cfg)
    shardings = train_state_shardings(codec, tx, mesh, cfg.fsdp)
    runtime = Runtime(platform or jax.default_backend(), mesh)
    fn = jit_train_step(make_train_step(codec, tx, schedule, runtime, cfg.fsdp), shardings, mesh)
    return TrainStep(codec, tx, schedule, shardings, runtime, fn)
