"""The KV-cache forward pass that generation runs: the model's own modules, attending to a cache.

``decode`` runs a chunk of tokens placed at cache slots ``cache_index..+T`` through the same
embeddings, blocks and head as ``GPT.__call__`` (minus dropout), but each block's attention reads
the keys and values of earlier chunks from a cache instead of recomputing them.

Layouts: keys ``[batch, heads, head_dim, slots]`` (transposed), values ``[batch, heads, slots, head_dim]``.
In these both attention products of a decode step are plain batched matmuls; with the usual layout
for keys, XLA:CPU transposes the whole cache every step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT, mask_logits

Array = jax.Array


class KVCache(NamedTuple):
    """One layer's keys [B, H, D, S] and values [B, H, S, D]."""

    key: Array
    value: Array


def init_cache(config: GPTConfig, batch_size: int, max_len: int, dtype=None) -> list[KVCache]:
    """Empty KV caches, one per layer, for ``batch_size`` sequences of up to ``max_len`` positions."""
    b, h, d, dtype = batch_size, config.n_head, config.head_dim, dtype or config.dtype
    return [
        KVCache(jnp.zeros((b, h, d, max_len), dtype), jnp.zeros((b, h, max_len, d), dtype))
        for _ in range(config.n_layer)
    ]


def decode(
    model: GPT,
    tokens: Array,
    cache: list[KVCache],
    cache_index: Array | int,
    positions: Array,
    key_mask: Array,
    *,
    last_only: bool = False,
    last_index: Array | None = None,
) -> tuple[Array, list[KVCache]]:
    """Runs ``tokens`` [B, T] placed at cache slots ``cache_index..+T``; returns logits and the new cache.

    ``positions`` [B, T] are the tokens' position ids and ``key_mask`` [B, S] marks the cache slots that
    hold real tokens (False for padding), so prompts of different lengths share one batch.
    ``cache_index`` is one slot for every row, or one per row ([B]: rows at different lengths, as a
    server's batch is). ``last_only`` returns the logits of the last token only ([B, 1, vocab]): a
    prefill needs no more, and the head's matmul over every prompt token would cost about a third of
    the prefill; ``last_index`` [B] picks another token of each row instead (right-padded prompts).
    """
    b, t = tokens.shape
    s = cache[0].value.shape[2]
    assert len(cache) == model.config.n_layer and key_mask.shape == (b, s), (len(cache), key_mask.shape)
    query_slot = jnp.asarray(cache_index, jnp.int32)[..., None] + jnp.arange(t)  # [T] or [B, T]
    causal = jnp.arange(s) <= query_slot[..., None]  # [T, S] or [B, T, S]
    mask = jnp.expand_dims(causal, -3) & key_mask[:, None, None, :]  # [B, 1, T, S]
    x = model.embed(tokens, positions)
    new_cache = []
    for block, layer_cache in zip(model.h, cache, strict=True):
        q, k, v = block.attn.qkv(block.ln_1(x), positions)  # rotary at each token's position
        y, layer_cache = cached_attention(q, k, v, layer_cache, cache_index, mask)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
        new_cache.append(layer_cache)
    if last_only:
        x = x[:, -1:] if last_index is None else jnp.take_along_axis(x, last_index[:, None, None], axis=1)
    return model.logits(model.ln_f(x)), new_cache


def cached_attention(
    q: Array, k: Array, v: Array, cache: KVCache, cache_index: Array | int, mask: Array
) -> tuple[Array, KVCache]:
    """Attention of a chunk's q, k, v [B, T, H, D] placed at cache slots cache_index..+T; returns y and the new cache.

    ``mask`` [B, 1, T, S] says which cache slots each query sees. The chunk's own keys are scored
    apart from the cache, which is read first and updated in place last: read after the update,
    XLA:CPU keeps a copy of every layer's cache each step (jaxgpt.sampling compiles so that, read
    before, it keeps none). Scores and softmax are float32. A ``cache_index`` per row [B] runs each
    row on its own (vmapped), so every row sees exactly what it would see in a batch of one.
    """
    if jnp.ndim(cache_index) == 1:
        one_row = lambda q, k, v, key, value, i, m: cached_attention(
            q[None], k[None], v[None], KVCache(key[None], value[None]), i, m[None]
        )
        y, new = jax.vmap(one_row)(q, k, v, cache.key, cache.value, cache_index, mask)
        return y[:, 0], KVCache(new.key[:, 0], new.value[:, 0])
    t, s = q.shape[1], cache.value.shape[2]
    index = jnp.asarray(cache_index, jnp.int32)
    scores = jnp.concatenate(  # [B, H, T, S + T]: the cache's slots, then the chunk's own
        [
            jnp.einsum("bthd,bhds->bhts", q, cache.key.astype(q.dtype), preferred_element_type=jnp.float32),
            jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32),
        ],
        axis=-1,
    )
    earlier = mask & (jnp.arange(s) < index)  # slots from cache_index on are stale until written below
    visible = jnp.concatenate([earlier, jax.lax.dynamic_slice_in_dim(mask, index, t, axis=3)], axis=-1)
    weights = jax.nn.softmax(mask_logits(scores / math.sqrt(q.shape[-1]), visible), axis=-1).astype(v.dtype)
    y = jnp.einsum("bhts,bhsd->bthd", weights[..., :s], cache.value.astype(v.dtype))
    y += jnp.einsum("bhts,bshd->bthd", weights[..., s:], v)
    zero = jnp.zeros((), jnp.int32)
    keys = jnp.transpose(k, (0, 2, 3, 1)).astype(cache.key.dtype)  # [B, H, D, T]
    values = jnp.transpose(v, (0, 2, 1, 3)).astype(cache.value.dtype)  # [B, H, T, D]
    return y, KVCache(
        jax.lax.dynamic_update_slice(cache.key, keys, (zero, zero, zero, index)),
        jax.lax.dynamic_update_slice(cache.value, values, (zero, zero, index, zero)),
    )
