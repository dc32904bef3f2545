"""Next-token cross-entropy, shared by training, validation and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at every position, float32 [B, T]; padded-vocabulary logits are already masked."""
    assert logits.shape[:-1] == targets.shape, (logits.shape, targets.shape)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean negative log-likelihood over the positions (weighted: padding gets weight 0)."""
    nll = -token_log_probs(logits, targets)
    if weights is None:
        return nll.mean()
    weights = weights.astype(jnp.float32)
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)
