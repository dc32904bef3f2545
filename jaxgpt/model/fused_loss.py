"""The tied output head and cross-entropy fused, so [tokens, vocab] logits are never stored whole.

The plain path writes float32 logits [B, T, padded_vocab], then their softmax and gradient of the
same size: for GPT-2 at 64 x 1024 tokens that is 13 GB a tensor and over a third of the step's
memory traffic. Here the sequence is cut into tiles of about ``chunk_tokens`` tokens; each tile's
logits exist only inside one loop iteration. As in llm.c's fused classifier and Liger's fused
linear cross-entropy, the training pass also turns each tile's ``softmax - onehot`` into the
hidden-state and embedding gradients right away: the backward pass only scales them, so the head's
matmuls run three times (as in the plain path), not four.

Numerics follow ``GPT.logits``: the head matmul runs in the hidden states' dtype, log-sum-exp and
the softmax in float32, and padded-vocabulary entries (ids >= ``vocab_size``) get probability 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt.core.platform import Runtime
from jaxgpt.model.gpt import mask_logits
from jaxgpt.model.kernels import head_kernel

CHUNK_TOKENS = 16384  # tokens per tile on each device of the data axis: a GPT-2 tile of bf16 logits is 1.6 GB


def _tile_length(batch: int, seq_len: int, chunk_tokens: int) -> int:
    return max(1, min(seq_len, chunk_tokens // batch))


def _pad_sequence(x: jax.Array, length: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _tile_logits(h: jax.Array, embedding: jax.Array, vocab_size: int) -> jax.Array:
    """float32 [B, t, padded_vocab]: the tied head on one tile, padded ids masked like ``GPT.logits``."""
    logits = jnp.einsum("btc,vc->btv", h, embedding).astype(jnp.float32)
    if embedding.shape[0] == vocab_size:
        return logits
    return mask_logits(logits, jnp.arange(embedding.shape[0]) < vocab_size)


def _logsumexp(logits: jax.Array) -> jax.Array:
    """log-sum-exp over the last axis in one read of ``logits``: a running (max, sum of exp) per row.

    ``jax.nn.logsumexp`` reads the tile twice (its max, then the sum of exps shifted by it); here
    one variadic reduction merges partial (max, sum) pairs as online softmax does. Not differentiable.
    """
    low = jnp.finfo(jnp.float32).min  # like the masked entries: exp(low - m) is 0 for any real max m

    def merge(a, b):
        (max_a, sum_a), (max_b, sum_b) = a, b
        top = jnp.maximum(max_a, max_b)
        return top, sum_a * jnp.exp(max_a - top) + sum_b * jnp.exp(max_b - top)

    ones = jnp.ones_like(logits)
    top, total = jax.lax.reduce((logits, ones), (low, jnp.float32(0)), merge, (logits.ndim - 1,))
    return top + jnp.log(total)


def _tile_logits_and_lse(
    h: jax.Array, embedding: jax.Array, vocab_size: int, kernel: Runtime | None
) -> tuple[jax.Array, jax.Array]:
    """float32 logits [B, t, Vp] (padded ids masked) and their log-sum-exp [B, t]: XLA's matmul and a
    one-pass reduction, or with ``kernel`` (the runtime it runs in) the Pallas head kernel where the tile
    fits it (one read fewer)."""
    if kernel is not None and head_kernel.fits(h.shape, embedding.shape[0], kernel):
        logits, lse = head_kernel.head_logits(h, embedding, vocab_size, kernel)
        return logits.astype(jnp.float32), lse
    logits = _tile_logits(h, embedding, vocab_size)
    return logits, _logsumexp(logits)


def _target_logits(h: jax.Array, embedding: jax.Array, targets: jax.Array) -> jax.Array:
    """float32 [B, t]: each target's logit from its embedding row, so the logits tile is not read for it.

    Rounded through the compute dtype like the head's matmul output, so it equals the tile's entry.
    """
    dot = jnp.einsum("btc,btc->bt", h, embedding[targets], preferred_element_type=jnp.float32)
    return dot.astype(h.dtype).astype(jnp.float32)


def _tiled(h: jax.Array, targets: jax.Array, weights: jax.Array, chunk_tokens: int):
    """Pads the sequence to whole tiles (weight 0) and returns (h, targets, weights, tile, n_tiles)."""
    b, t = targets.shape
    tile = _tile_length(b, t, chunk_tokens)
    n_tiles = -(-t // tile)
    if n_tiles * tile != t:
        h, targets, weights = (_pad_sequence(x, n_tiles * tile) for x in (h, targets, weights))
    return h, targets.astype(jnp.int32), weights, tile, n_tiles


def fused_token_log_probs(
    h: jax.Array,
    embedding: jax.Array,
    targets: jax.Array,
    vocab_size: int,
    chunk_tokens: int = CHUNK_TOKENS,
    kernel: Runtime | None = None,
) -> jax.Array:
    """log p(target) float32 [B, T] from final hidden states [B, T, C] and the tied embedding [Vp, C]."""
    assert h.shape[:2] == targets.shape and h.shape[-1] == embedding.shape[-1], (h.shape, targets.shape)
    t = targets.shape[1]
    embedding = embedding.astype(h.dtype)
    h, targets, _, tile, n_tiles = _tiled(h, targets, jnp.zeros(targets.shape), chunk_tokens)

    def body(i, out):
        start = i * tile
        h_tile = jax.lax.dynamic_slice_in_dim(h, start, tile, axis=1)
        _, lse = _tile_logits_and_lse(h_tile, embedding, vocab_size, kernel)
        tile_targets = jax.lax.dynamic_slice_in_dim(targets, start, tile, axis=1)
        log_probs = _target_logits(h_tile, embedding, tile_targets) - lse
        return jax.lax.dynamic_update_slice_in_dim(out, log_probs, start, axis=1)

    out = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros(targets.shape, jnp.float32))
    return out[:, :t]


def _nll_sum(h, embedding, targets, weights, vocab_size, chunk_tokens, kernel, axis):
    """sum(weights * -log p(target)) over ``axis``, differentiated (slowly) through the tile loop."""
    return -(fused_token_log_probs(h, embedding, targets, vocab_size, chunk_tokens, kernel) * weights).sum(axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _weighted_nll(h, embedding, targets, weights, vocab_size, chunk_tokens, kernel):
    """The scalar ``_nll_sum``, its gradient computed in the forward pass (``_weighted_nll_fwd``)."""
    return _nll_sum(h, embedding, targets, weights, vocab_size, chunk_tokens, kernel, None)


def _weighted_nll_fwd(h, embedding, targets, weights, vocab_size, chunk_tokens, kernel):
    """The loss and its gradients for a cotangent of 1, tile by tile in one pass."""
    t = targets.shape[1]
    head = embedding.astype(h.dtype)
    h_tiles, targets, weights, tile, n_tiles = _tiled(h, targets, weights.astype(jnp.float32), chunk_tokens)

    def body(i, carry):
        loss, grad_h, grad_embedding = carry
        start = i * tile
        h_tile = jax.lax.dynamic_slice_in_dim(h_tiles, start, tile, axis=1)
        tile_targets = jax.lax.dynamic_slice_in_dim(targets, start, tile, axis=1)
        tile_weights = jax.lax.dynamic_slice_in_dim(weights, start, tile, axis=1)
        logits, lse = _tile_logits_and_lse(h_tile, head, vocab_size, kernel)
        loss += ((lse - _target_logits(h_tile, head, tile_targets)) * tile_weights).sum()
        # d loss / d logits = weight * (softmax - onehot); masked ids have softmax exactly 0.
        onehot = jnp.arange(logits.shape[-1]) == tile_targets[..., None]
        grad_logits = ((jnp.exp(logits - lse[..., None]) - onehot) * tile_weights[..., None]).astype(h.dtype)
        grad_h_tile = jnp.einsum("btv,vc->btc", grad_logits, head)
        grad_h = jax.lax.dynamic_update_slice_in_dim(grad_h, grad_h_tile, start, axis=1)
        grad_embedding += jnp.einsum("btv,btc->vc", grad_logits, h_tile, preferred_element_type=jnp.float32)
        return loss, grad_h, grad_embedding

    init = (jnp.zeros((), jnp.float32), jnp.zeros_like(h_tiles), jnp.zeros(embedding.shape, jnp.float32))
    loss, grad_h, grad_embedding = jax.lax.fori_loop(0, n_tiles, body, init)
    return loss, (grad_h[:, :t], grad_embedding.astype(embedding.dtype))


def _weighted_nll_bwd(vocab_size, chunk_tokens, kernel, residuals, cotangent):
    grad_h, grad_embedding = residuals
    scale = lambda g: (g * cotangent).astype(g.dtype)
    return scale(grad_h), scale(grad_embedding), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def fused_weighted_nll(
    h: jax.Array,
    embedding: jax.Array,
    targets: jax.Array,
    vocab_size: int,
    weights: jax.Array,
    chunk_tokens: int = CHUNK_TOKENS,
    kernel: Runtime | None = None,
    axis: int | tuple[int, ...] | None = None,
) -> jax.Array:
    """sum(weights * -log p(target)) over ``axis`` of the head ``embedding`` [Vp, C] on ``h`` [B, T, C], as
    ``losses.weighted_nll`` of the materialised logits; no gradient flows to ``weights``.

    The scalar (``axis=None``, the training loss) gets the one-pass gradient of the module doc; other sums
    (``-1``: per row, ``()``: per token) are for scoring. ``kernel`` (a runtime): logits and log-sum-exp
    from ``jaxgpt.model.kernels.head_kernel`` where a tile fits it.
    """
    assert h.shape[:2] == targets.shape == weights.shape, (h.shape, targets.shape, weights.shape)
    assert h.shape[-1] == embedding.shape[-1], (h.shape, embedding.shape)
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    if axis is None:
        return _weighted_nll(h, embedding, targets, weights, vocab_size, chunk_tokens, kernel)
    return _nll_sum(h, embedding, targets, weights, vocab_size, chunk_tokens, kernel, axis)
