"""Direct preference optimisation (Rafailov et al., 2023) as TRL's ``DPOTrainer`` computes it.

For a pair, ``log pi(y | x)`` is the SUM of the completion tokens' log-probabilities (TRL's
``completion_mask``: the reply after ``Assistant:``, through the EOT that closes it). With the frozen
reference ``pi_ref`` (the starting weights) the implicit rewards are ``beta * (log pi - log pi_ref)``
of the chosen and the rejected reply, and the loss is the sigmoid loss
``-log sigmoid(r_chosen - r_rejected)``, averaged over the step's pairs. The metrics are TRL's:
``rewards/chosen``, ``rewards/rejected`` (mean rewards), ``rewards/accuracies`` (share of pairs with
``r_chosen > r_rejected``) and ``rewards/margins`` (mean ``r_chosen - r_rejected``). Dropout is not
applied, as TRL's ``disable_dropout``. ``sft_weight`` adds TRL's ``"sft"`` loss type (``loss_type=["sigmoid",
"sft"]``, ``loss_weights=[1, W]``: RPO, Pang et al., 2024): W times the mean NLL of the chosen replies' tokens,
which keeps DPO from lowering the likelihood of both replies. ``loss_type="ipo"`` is TRL's IPO (Azar et al.,
2023): ``(d - 1 / (2 beta))**2`` with ``d`` the difference of the two replies' log-ratios per completion token.
The sigmoid loss pushes a margin that every pair wins without bound (the rejected reply's tokens toward
probability 0); IPO's square stops at a margin set by ``beta``, so the policy stays near the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgpt.core.errors import UserError
from jaxgpt.core.platform import Runtime, local_runtime
from jaxgpt.core.sharding import batch_sharding
from jaxgpt.data.pipeline import Pairs, open_examples
from jaxgpt.model.gpt import GPT
from jaxgpt.model.losses import model_weighted_nll
from jaxgpt.model.params import ParamCodec, Params
from jaxgpt.train.step import Batch

HALVES = ("chosen", "rejected")
LossType = Literal["sigmoid", "ipo"]


def sequence_log_probs(
    model: GPT, inputs: jax.Array, targets: jax.Array, weights: jax.Array, runtime: Runtime | None = None
) -> jax.Array:
    """sum(weights * log p(target)) per row, float32 [B]: a completion's log-probability."""
    return -model_weighted_nll(model, inputs, targets, weights, None, runtime, axis=-1)


def pair_log_probs(model: GPT, batch: Batch, runtime: Runtime | None = None) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) sequence log-probs [B] of a pair batch, in one forward pass over both halves."""
    inputs, targets, weights = (
        jnp.concatenate([batch[f"{h}_{k}"] for h in HALVES]) for k in ("inputs", "targets", "weights")
    )
    chosen, rejected = jnp.split(sequence_log_probs(model, inputs, targets, weights, runtime), 2)
    return chosen, rejected


def dpo_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float,
    loss_type: LossType = "sigmoid",
    lengths: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair DPO losses [B] and TRL's per-pair reward metrics (average them over pairs).

    ``lengths``: the (chosen, rejected) completion token counts [B], which IPO divides the log-ratios by.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    reward_chosen = beta * jax.lax.stop_gradient(chosen_ratio)
    reward_rejected = beta * jax.lax.stop_gradient(rejected_ratio)
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * (chosen_ratio - rejected_ratio))
    else:
        assert loss_type == "ipo" and lengths is not None, (loss_type, lengths)
        per_token = chosen_ratio / jnp.maximum(lengths[0], 1.0) - rejected_ratio / jnp.maximum(lengths[1], 1.0)
        losses = (per_token - 1 / (2 * beta)) ** 2
    metrics = {
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        "rewards/accuracies": (reward_chosen > reward_rejected).astype(jnp.float32),
        "rewards/margins": reward_chosen - reward_rejected,
    }
    return losses, metrics


@dataclasses.dataclass(frozen=True)
class DPO:
    """The DPO objective for ``jaxgpt.train.step.make_train_step``: batches of pairs, a frozen reference."""

    beta: float = 0.1
    sft_weight: float = 0.0  # weight of the chosen replies' mean token NLL (TRL's "sft" loss type; 0: plain DPO)
    loss_type: LossType = "sigmoid"

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise UserError(f"--dpo_beta must be positive, got {self.beta}")
        if not self.sft_weight >= 0:
            raise UserError(f"--dpo_sft_weight must be >= 0, got {self.sft_weight}")

    def scale(self, batch: Batch) -> float:
        if "chosen_inputs" not in batch:
            raise UserError("--objective dpo trains on preference pairs: prepare the data with --format preference")
        accum, pairs = batch["chosen_inputs"].shape[:2]
        return 1.0 / (accum * pairs)  # the step's loss and metrics: means over its pairs

    def loss(self, model: GPT, micro: Batch, key: jax.Array | None, reference: GPT | None, runtime: Runtime):
        assert reference is not None, "DPO needs the reference model"
        ref = jax.lax.stop_gradient(pair_log_probs(reference, micro, runtime))
        chosen, rejected = pair_log_probs(model, micro, runtime)
        losses, metrics = dpo_loss(chosen, rejected, *ref, self.beta, self.loss_type, lengths(micro))
        loss = losses.sum()
        if self.sft_weight:  # TRL's mean over the (micro-)batch's chosen tokens, times the pairs the step divides by
            nll = -chosen.sum() / jnp.maximum(micro["chosen_weights"].sum(), 1.0)
            loss += self.sft_weight * nll * chosen.shape[0]
        return loss, {name: value.sum() for name, value in metrics.items()}

    def evaluate(self, codec: ParamCodec, params: Params, reference: Params, data_dir: str, **kwargs) -> dict:
        return evaluate_dpo(codec, params, reference, data_dir, beta=self.beta, loss_type=self.loss_type, **kwargs)


def lengths(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Each pair's (chosen, rejected) completion token counts [B]."""
    return batch["chosen_weights"].sum(axis=-1), batch["rejected_weights"].sum(axis=-1)


@functools.lru_cache(maxsize=8)
def _pair_scorer(codec: ParamCodec, beta: float, loss_type: LossType):
    """Per-pair losses and rewards, compiled once; XLA partitions it over the arrays' shardings."""

    def score(params: Params, reference: Params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        runtime = local_runtime()
        ref = pair_log_probs(codec.to_model(reference), batch, runtime)
        return dpo_loss(*pair_log_probs(codec.to_model(params), batch, runtime), *ref, beta, loss_type, lengths(batch))

    return jax.jit(score)


def evaluate_dpo(
    codec: ParamCodec,
    params: Params,
    reference: Params,
    data_dir: str | os.PathLike,
    *,
    beta: float,
    loss_type: LossType = "sigmoid",
    batch_size: int,
    max_batches: int | None = None,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """The DPO loss and reward metrics averaged over the first ``max_batches`` batches of val pairs
    (``val_loss``, ``val_rewards/accuracies``, ...); the last batch is padded and its padding not counted."""
    pairs = open_examples(data_dir, "val", codec.config.block_size)
    if not isinstance(pairs, Pairs):
        raise UserError(f"{data_dir} holds no preference pairs; prepare it with --format preference")
    count = len(pairs) if max_batches is None else min(len(pairs), max_batches * batch_size)
    score = _pair_scorer(codec, beta, loss_type)
    totals: dict[str, float] = {}
    for first in range(0, count, batch_size):
        ids = np.minimum(np.arange(first, first + batch_size), count - 1)
        batch = pairs.batch(ids)
        if mesh is not None:
            batch = jax.device_put(batch, batch_sharding(mesh))
        losses, metrics = jax.device_get(score(params, reference, batch))
        real = np.arange(first, first + batch_size) < count
        for name, value in {"loss": losses, **metrics}.items():
            totals[name] = totals.get(name, 0.0) + float(np.asarray(value)[real].sum())
    return {f"val_{name}": total / count for name, total in totals.items()}
