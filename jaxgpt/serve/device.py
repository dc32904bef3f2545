"""The engine's device side: per-row sampling and the compiled prefill, decode step and prompt scoring.

Every slot of the server's batch carries its own sampling rule (temperature, top-k, top-p, seed) as
traced arrays, so a new mix of requests never recompiles: the prefill compiles once per prompt bucket,
the decode step once per bucket of rows and of cache slots. The random draw of a row's n-th token
depends only on its seed and n (``fold_in(key(seed), n)``), so a seeded request samples the same
tokens whatever shares its batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.model.decoding import KVCache, decode, init_cache
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling.generate import CPU_DECODE_OPTIONS, _argmax, _nucleus_threshold

Array = jax.Array
TOP_LOGPROBS = 5  # the most alternatives a request may ask for per token (``logprobs``), as OpenAI's completions


class RowRules(NamedTuple):
    """Each row's sampling rule, arrays [B]: temperature 0 is greedy, top_k 0 and top_p 1 are off."""

    temperature: Array
    top_k: Array
    top_p: Array
    seed: Array  # uint32
    count: Array  # tokens the row has generated before this one: the draw's fold-in
    logprobs: Array  # bool: compute the top alternatives


class Picked(NamedTuple):
    """What a step hands the host per row: the token, its log-probability, the top alternatives."""

    token: Array  # [B] int32
    logprob: Array  # [B] float32, under the model's own distribution (before temperature and filters)
    top_ids: Array  # [B, TOP_LOGPROBS] int32 (zeros unless some row asked)
    top_logprobs: Array  # [B, TOP_LOGPROBS] float32


def filter_rows(logits: Array, top_k: Array, top_p: Array) -> Array:
    """``logits`` [B, V] with tokens outside each row's top-k, then its top-p nucleus, at -inf.

    As ``jaxgpt.sampling.generate.process_logits`` (ties with the k-th kept), but k and p are per-row arrays:
    the k-th largest probability is found by bisection, as the nucleus threshold is.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    k = jnp.where(top_k > 0, top_k, logits.shape[-1]).astype(jnp.float32)[:, None]
    count_from = lambda t: jnp.sum((probs >= t).astype(jnp.float32), axis=-1, keepdims=True)

    def bisect(_, bounds):
        low, high = bounds
        mid = (low + high) / 2
        enough = count_from(mid) >= k
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

    low = jnp.zeros((logits.shape[0], 1), probs.dtype)
    kth = jax.lax.fori_loop(0, 40, bisect, (low, jnp.full_like(low, 2.0)))[0]
    logits = jnp.where(probs >= jnp.where(top_k[:, None] > 0, kth, 0.0), logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    nucleus = _nucleus_threshold(probs, top_p[:, None])
    return jnp.where(probs >= jnp.where(top_p[:, None] < 1, nucleus, 0.0), logits, -jnp.inf)


def pick(logits: Array, rules: RowRules) -> Picked:
    """Each row's next token from ``logits`` [B, V] under its own rule; greedy rows take the argmax.

    The random draws and the filters run only when some row needs them (``lax.cond``): a greedy
    batch costs no more than ``jaxgpt.sampling``'s greedy step.
    """
    logits = logits.astype(jnp.float32)
    greedy = _argmax(logits)
    sampled = rules.temperature > 0

    def draw() -> Array:
        scaled = logits / jnp.where(sampled, rules.temperature, 1.0)[:, None]
        needs_filter = jnp.any(sampled & ((rules.top_k > 0) | (rules.top_p < 1)))
        scaled = jax.lax.cond(needs_filter, filter_rows, lambda x, *_: x, scaled, rules.top_k, rules.top_p)
        keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(rules.seed, rules.count)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:]))(keys)
        return jnp.where(sampled, _argmax(scaled + noise), greedy)

    token = jax.lax.cond(jnp.any(sampled), draw, lambda: greedy)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    logprob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    shape = (logits.shape[0], TOP_LOGPROBS)
    no_top = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32))
    top_logprobs, top_ids = jax.lax.cond(
        jnp.any(rules.logprobs), lambda: tuple(jax.lax.top_k(log_probs, TOP_LOGPROBS)), lambda: no_top
    )
    return Picked(token, logprob, top_ids.astype(jnp.int32), top_logprobs)


class Compiled(NamedTuple):
    prefill: jax.stages.Wrapped
    step: jax.stages.Wrapped
    score: jax.stages.Wrapped


@functools.lru_cache(maxsize=4)
def compiled(graphdef: nnx.GraphDef, treedef: jax.tree_util.PyTreeDef) -> Compiled:
    """The jitted prefill (one compilation per prompt bucket), decode step (one per row and slot bucket), scoring.

    Parameters come as a flat list of leaves (see ``jaxgpt.sampling.generate._compiled`` for why); the
    cache and the batch's current tokens are donated and updated in place.
    """
    merge = lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

    def prefill(leaves, cache, tokens, row, prompt, length, rules):
        """A right-padded prompt [1, P] of ``length`` real tokens into cache row ``row``, its first token sampled."""
        model = merge(leaves)
        p = prompt.shape[1]
        positions = jnp.arange(p, dtype=jnp.int32)[None]
        logits, fresh = decode(
            model, prompt, init_cache(model.config, 1, p, cache[0].key.dtype), 0, positions,
            jnp.ones((1, p), bool), last_only=True, last_index=jnp.reshape(length - 1, (1,)),
        )  # fmt: skip
        zero = jnp.zeros((), jnp.int32)
        at = (row.astype(jnp.int32), zero, zero, zero)
        cache = [
            KVCache(jax.lax.dynamic_update_slice(c.key, f.key, at), jax.lax.dynamic_update_slice(c.value, f.value, at))
            for c, f in zip(cache, fresh, strict=True)
        ]
        picked = pick(logits[:, 0], jax.tree.map(lambda x: jnp.reshape(x, (1,)), rules))
        return cache, tokens.at[row].set(picked.token[0]), picked

    def step(leaves, cache, tokens, index, rules, rows, slots):
        """The first ``rows`` rows' tokens at their own slots ``index``; returns the cache and their next tokens.

        ``rows`` and ``slots`` (static: one compilation per pair of buckets) let a few short requests run as
        a small batch over the first ``slots`` cache slots: the engine fills the lowest free row first, and a
        step's cost grows with its rows and the slots it reads. A part is copied out and written back in place;
        the whole cache (every row, every slot) is updated in place by ``decode`` itself.
        """
        model = merge(leaves)
        whole = rows == cache[0].key.shape[0] and slots == cache[0].key.shape[3]
        part = cache if whole else [KVCache(c.key[:rows, :, :, :slots], c.value[:rows, :, :slots]) for c in cache]
        key_mask = jnp.ones((rows, slots), bool)  # slots past a row's index are hidden
        index = index[:rows]
        logits, part = decode(model, tokens[:rows, None], part, index, index[:, None], key_mask)
        picked = pick(logits[:, 0], jax.tree.map(lambda x: x[:rows], rules))
        if whole:  # decode updated the (donated) cache in place
            return part, tokens.at[:rows].set(picked.token), picked
        zero = jnp.zeros((), jnp.int32)
        cache = [
            KVCache(jax.lax.dynamic_update_slice(c.key, p.key, (zero,) * 4),
                    jax.lax.dynamic_update_slice(c.value, p.value, (zero,) * 4))
            for c, p in zip(cache, part, strict=True)
        ]  # fmt: skip
        return cache, tokens.at[:rows].set(picked.token), picked

    def score(leaves, prompt):
        """Log-probabilities of a prompt [1, P]'s tokens after their predecessors, and the top alternatives."""
        log_probs = jax.nn.log_softmax(merge(leaves)(prompt)[0].astype(jnp.float32), axis=-1)  # [P, V]
        token = jnp.take_along_axis(log_probs[:-1], prompt[0, 1:, None], axis=-1)[:, 0]
        top_logprobs, top_ids = jax.lax.top_k(log_probs, TOP_LOGPROBS)
        return token, top_ids, top_logprobs

    options = CPU_DECODE_OPTIONS if jax.default_backend() == "cpu" else None
    return Compiled(
        jax.jit(prefill, donate_argnums=(1, 2), compiler_options=options),
        jax.jit(step, donate_argnums=(1, 2), static_argnames=("rows", "slots"), compiler_options=options),
        jax.jit(score),
    )


def model_leaves(model: GPT) -> tuple[list[Array], Compiled]:
    """The model's parameters as flat leaves, and the compiled functions of its structure."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return leaves, compiled(graphdef, treedef)
