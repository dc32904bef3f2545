"""Next-token cross-entropy, shared by training, validation and evaluation.

One loss, :func:`model_weighted_nll`: ``sum(weights * -log p(target))`` of a model on a batch, summed
over the whole batch (the training loss, chat masks included), per row (evaluation, HellaSwag) or per
token. It runs the output head and the loss either plainly (float32 logits [B, T, vocab], then
:func:`weighted_nll`) or fused (``jaxgpt.model.fused_loss``: tile by tile, no [B, T, vocab] tensor), as
``GPTConfig.loss`` says; both give the same numbers. The mean (:func:`model_loss`,
:func:`cross_entropy`) is the weighted sum under :func:`mean_weights`.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from jaxgpt.core.platform import Runtime, local_runtime
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.fused_loss import CHUNK_TOKENS, fused_weighted_nll
from jaxgpt.model.gpt import GPT


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at every position, float32 [B, T]; padded-vocabulary logits are already masked."""
    assert logits.shape[:-1] == targets.shape, (logits.shape, targets.shape)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def mean_weights(shape: tuple[int, ...], weights: jax.Array | None = None) -> jax.Array:
    """float32 weights under which a weighted NLL sum is the mean NLL: 1/N at each of the N positions, or
    ``weights`` (padding gets 0) over their sum, at least 1 so that an all-padding batch gives 0, not NaN."""
    if weights is None:
        return jnp.full(shape, 1.0 / math.prod(shape), jnp.float32)
    weights = weights.astype(jnp.float32)
    return weights / jnp.maximum(weights.sum(), 1.0)


def weighted_nll(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """sum(weights * -log p(target)) over ``axis`` (``None``: all, ``-1``: per row, ``()``: per token) of
    materialised logits: the plain path of :func:`model_weighted_nll`."""
    return -(token_log_probs(logits, targets) * weights).sum(axis)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean negative log-likelihood over the positions (weighted: padding gets weight 0)."""
    return weighted_nll(logits, targets, mean_weights(targets.shape, weights))


def resolve_loss(config: GPTConfig, platform: str) -> str:
    """``fused``, ``fused_pallas`` or ``plain``; auto is plain on the CPU, where the plain path measured faster
    (docs/benchmarks.md), and with a logit soft-cap, which the fused loss does not apply. The Pallas head
    kernel is compiled for GPUs only (elsewhere it would run in Pallas' slow interpreter)."""
    if config.loss == "auto":
        return "plain" if platform == "cpu" or config.logit_softcap else "fused"
    if config.loss == "fused_pallas" and platform != "gpu":
        warnings.warn(f"loss='fused_pallas' needs a GPU (backend {platform}); using 'fused'", stacklevel=2)
        return "fused"
    return config.loss


def head_weights(model: GPT) -> jax.Array:
    """The output head as [padded_vocab, n_embd]: the token embedding, or the untied head's kernel transposed."""
    return model.wte.embedding[...] if model.lm_head is None else model.lm_head.kernel[...].T


def model_weighted_nll(
    model: GPT,
    inputs: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    dropout_key: jax.Array | None = None,
    runtime: Runtime | None = None,
    *,
    axis: int | tuple[int, ...] | None = None,
) -> jax.Array:
    """sum(weights * -log p(target)) over ``axis`` (``None``: the batch, ``-1``: per row, ``()``: per token) of
    ``model`` reading ``inputs``: the loss every other form (mean, masked, per-row scores) derives from."""
    runtime = runtime or local_runtime()
    loss = resolve_loss(model.config, runtime.platform)
    if loss == "plain":
        return weighted_nll(model(inputs, dropout_key=dropout_key, runtime=runtime), targets, weights, axis)
    features = model.features(inputs, dropout_key=dropout_key, runtime=runtime)
    tiling = _tiling(loss, runtime)
    return fused_weighted_nll(
        features, head_weights(model), targets, model.config.vocab_size, weights, axis=axis, **tiling
    )


def model_loss(
    model: GPT,
    inputs: jax.Array,
    targets: jax.Array,
    dropout_key: jax.Array | None = None,
    runtime: Runtime | None = None,
) -> jax.Array:
    """Mean next-token cross-entropy of ``model`` on a batch: the training loss."""
    return model_weighted_nll(model, inputs, targets, mean_weights(targets.shape), dropout_key, runtime)


def _tiling(loss: str, runtime: Runtime) -> dict:
    """The fused loss's tiles: ``CHUNK_TOKENS`` on every device of the step's data axis (smaller tiles would
    re-read and re-write the float32 embedding gradient, which every tile adds to, more often: on a v5e 2x2
    slice 4096 global tokens cost 0.23 MB a token more), through the Pallas head kernel for ``fused_pallas``."""
    kernel = runtime if loss == "fused_pallas" else None
    return dict(chunk_tokens=CHUNK_TOKENS * runtime.data_shards, kernel=kernel)
