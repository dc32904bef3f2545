"""Autoregressive generation with a KV cache: one compiled prefill, one compiled decode step.

Prompts of different lengths share a batch by LEFT-padding them to a bucketed length P, so every
prompt ends at cache slot P-1 and all rows write their next token into the same slot. Each row's
position ids count from its first real token, and ``key_mask`` hides the padding slots (see
``jaxgpt.model.decoding.decode``). P is rounded up to a power of two and the cache length to a multiple of 64, so a
new prompt length recompiles only when it crosses a bucket, and decoding never does: the slot is
a traced argument. The token loop runs in Python, so tokens can be streamed; each step is one
jitted call that donates the cache (updated in place) and the host reads tokens one step behind
the device, so it never stalls the next step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxgpt.core.distributed import to_host
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import batch_sharding, data_axis_size, kv_cache_sharding, spans_processes
from jaxgpt.model.decoding import decode, init_cache
from jaxgpt.model.gpt import GPT
from jaxgpt.tokenizer.encoding import EOT_ID

Array = jax.Array
MIN_PROMPT_BUCKET = 16  # prompt lengths are padded to a power of two, at least this
CACHE_MULTIPLE = 64  # the cache length is a multiple of this
EOT_CHECK_EVERY = 8  # without streaming, look for "every row ended" on the host this often
# XLA:CPU's default copy insertion keeps a copy of each layer's cache per step, although the step
# reads a cache before updating it in place (decoding.cached_attention); region analysis sees that none is needed.
CPU_DECODE_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@dataclasses.dataclass(frozen=True)
class SamplingRule:
    """How the next token is chosen; temperature 0 is greedy (top_k and top_p then do nothing).

    Compiled in as constants: each new combination compiles the prefill and decode step once.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1 (or None for no top-k filtering), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (or None for no nucleus filtering), got {self.top_p}")


def process_logits(
    logits: Array, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Array:
    """Logits [..., V] scaled by 1/temperature with tokens outside the top-k and the top-p nucleus at -inf.

    Ties with the k-th largest logit are kept (as in Hugging Face). The nucleus is the smallest set of
    most likely tokens whose probability reaches top_p; the most likely token is always in it.
    """
    assert temperature > 0, "temperature 0 is greedy: use sample_token"
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # min, not [..., -1]: XLA:CPU turns a slice of top_k into a full sort (100x slower)
        kth_largest = jnp.min(jax.lax.top_k(logits, top_k)[0], axis=-1, keepdims=True)
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs >= _nucleus_threshold(probs, top_p), logits, -jnp.inf)
    return logits


def _nucleus_threshold(probs: Array, top_p: float, iterations: int = 40) -> Array:
    """The largest t (to 2**-39) such that the tokens of probability >= t hold at least top_p of the mass.

    Found by bisection rather than by sorting the vocabulary: XLA's sort of 50k values is ~20x slower on CPU.
    """
    mass_from = lambda t: jnp.sum(jnp.where(probs >= t, probs, 0.0), axis=-1, keepdims=True)
    low = jnp.zeros((*probs.shape[:-1], 1), probs.dtype)  # every token: mass 1 >= top_p
    high = jnp.full_like(low, 2.0)  # no token: mass 0 < top_p

    def bisect(_, bounds):
        low, high = bounds
        mid = (low + high) / 2
        enough = mass_from(mid) >= top_p
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

    return jax.lax.fori_loop(0, iterations, bisect, (low, high))[0]


def sample_token(
    logits: Array, key: Array, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Array:
    """One token id per row of ``logits`` [..., V]: argmax when temperature is 0, else a filtered draw."""
    if temperature == 0:
        return _argmax(logits)
    logits = process_logits(logits, temperature, top_k, top_p)
    return _argmax(logits + jax.random.gumbel(key, logits.shape))  # Gumbel-max: as jax.random.categorical


def _argmax(x: Array) -> Array:
    """The first index of the largest value, as two plain reductions: XLA:CPU's argmax is ~7x slower, top_k ~2x."""
    n = x.shape[-1]
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(is_max, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
    return jnp.minimum(first, n - 1)  # NaN logits: the max is NaN and no index equals it


def bucket_prompt_len(n: int) -> int:
    """The prompt length compiled for ``n`` tokens: the next power of two (at least MIN_PROMPT_BUCKET), so
    that a few shapes serve every prompt."""
    return max(MIN_PROMPT_BUCKET, 1 << (n - 1).bit_length())


def bucket_cache_len(n: int) -> int:
    """The KV-cache length compiled for ``n`` positions: ``n`` rounded up to CACHE_MULTIPLE, for few shapes."""
    return -(-n // CACHE_MULTIPLE) * CACHE_MULTIPLE


def left_pad(prompts: Sequence[Sequence[int]], length: int, cache_len: int) -> tuple[np.ndarray, ...]:
    """Tokens and position ids [B, length] of left-padded prompts, and the cache's key_mask [B, cache_len]."""
    lengths = np.array([len(p) for p in prompts])
    assert lengths.min() >= 1 and lengths.max() <= length <= cache_len, (lengths, length, cache_len)
    pad = length - lengths[:, None]  # [B, 1]: slots before a prompt's first real token
    tokens = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, pad[row, 0] :] = prompt
    positions = np.maximum(np.arange(length)[None, :] - pad, 0).astype(np.int32)
    key_mask = np.arange(cache_len)[None, :] >= pad
    return tokens, positions, key_mask


@functools.lru_cache(maxsize=16)
def _compiled(graphdef: nnx.GraphDef, treedef: jax.tree_util.PyTreeDef, rule: SamplingRule):
    """The jitted prefill and decode step of one model structure and sampling rule.

    They take the parameters as a flat list: hashing a graphdef or flattening an ``nnx.State`` on
    every token would cost more than a small model's decode step.
    """
    sample = functools.partial(sample_token, temperature=rule.temperature, top_k=rule.top_k, top_p=rule.top_p)

    def prefill(leaves, cache, tokens, positions, key_mask, key):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        logits, cache = decode(model, tokens, cache, 0, positions, key_mask, last_only=True)
        last = tokens.shape[1] - 1  # every prompt ends at this slot
        return sample(logits[:, -1], jax.random.fold_in(key, last)), positions[:, -1] + 1, cache

    def step(leaves, cache, token, slot, positions, key_mask, key):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        logits, cache = decode(model, token[:, None], cache, slot, positions[:, None], key_mask)
        return sample(logits[:, 0], jax.random.fold_in(key, slot)), positions + 1, cache

    options = CPU_DECODE_OPTIONS if jax.default_backend() == "cpu" else None
    return (
        jax.jit(prefill, donate_argnums=1, compiler_options=options),
        jax.jit(step, donate_argnums=1, compiler_options=options),
    )


def _token_steps(
    model: GPT, prompts: list[list[int]], max_new_tokens: int, rule: SamplingRule, key: Array, mesh: Mesh | None
) -> Iterator[Array]:
    """Yields each step's new tokens [B] as device arrays, dispatched but not waited for."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    prefill, step = _compiled(graphdef, treedef, rule)
    prompt_len = bucket_prompt_len(max(len(p) for p in prompts))
    cache_len = bucket_cache_len(prompt_len + max_new_tokens - 1)
    tokens, positions, key_mask = left_pad(prompts, prompt_len, cache_len)
    rows = None if mesh is None else batch_sharding(mesh)
    cache_sharding = None if mesh is None else kv_cache_sharding(mesh, model.config.n_head)
    tokens, positions, key_mask = (jax.device_put(x, rows) for x in (tokens, positions, key_mask))
    shapes = jax.eval_shape(lambda: init_cache(model.config, len(prompts), cache_len))
    cache = jax.block_until_ready(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=cache_sharding), shapes))

    token, positions, cache = prefill(leaves, cache, tokens, positions, key_mask, key)
    yield token
    for slot in range(prompt_len, prompt_len + max_new_tokens - 1):
        token, positions, cache = step(leaves, cache, token, slot, positions, key_mask, key)
        yield token


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]] | np.ndarray | Array,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: Array | None = None,
    stop_at_eot: bool = True,
    on_token: Callable[[int, int], None] | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    mesh: Mesh | None = None,
    eot_id: int = EOT_ID,
) -> list[list[int]]:
    """The new token ids of each prompt (a list of token-id lists, or an int array [B, T]).

    An empty prompt starts from ``eot_id``. With ``stop_at_eot`` a row ends with its first end-of-text
    token (kept in its list) and generation stops once every row has ended. ``on_token(row, token)``
    is called for every returned token as soon as it is known (streaming). ``stop(tokens)`` ends a
    row once it returns True for the row's new tokens so far (checked whenever the host reads
    tokens, so a row may run a few tokens past the point: cut its text yourself). ``key`` (default
    ``jax.random.key(0)``) makes sampling reproducible. With a ``mesh`` (a model already placed by
    ``jaxgpt.core.sharding.shard_model``) the batch is split over ``data``, padded with dummy rows to fit.
    """
    rule = SamplingRule(temperature, top_k, top_p)
    rule = SamplingRule(0.0) if temperature == 0 else rule  # greedy ignores top_k/top_p: one compilation
    prompts = check_prompts(model, prompts, max_new_tokens, eot_id)
    batch = len(prompts)
    if mesh is not None and len(prompts) % data_axis_size(mesh):
        prompts += [prompts[-1]] * (data_axis_size(mesh) - len(prompts) % data_axis_size(mesh))
    key = jax.random.key(0) if key is None else key
    can_end = stop_at_eot or stop is not None
    read_every = 1 if on_token is not None else EOT_CHECK_EVERY if can_end else max_new_tokens
    out: list[list[int]] = [[] for _ in range(batch)]
    ended = np.zeros(batch, bool)
    pending: list[Array] = []  # device arrays the host has not read yet
    # Reading overlaps the newest step, except across processes: there one program runs at a time, as two
    # with collectives in flight at once (a step and the next, or a step and a gather) can deadlock gloo on CPU.
    in_flight = 0 if mesh is not None and spans_processes(mesh) else 1

    def read(arrays: list[Array]) -> None:
        for new in to_host(arrays):
            new = new[:batch]
            for row in np.flatnonzero(~ended):
                out[row].append(int(new[row]))
                if on_token is not None:
                    on_token(int(row), int(new[row]))
            ended[:] |= stop_at_eot & (new == eot_id)
        for row in np.flatnonzero(~ended) if stop is not None else ():
            ended[row] = stop(out[row])

    for i, token in enumerate(_token_steps(model, prompts, max_new_tokens, rule, key, mesh)):
        pending.append(token if in_flight else token.block_until_ready())
        if (i + 1) % read_every == 0 and len(pending) > in_flight:
            read(pending[: len(pending) - in_flight])
            del pending[: len(pending) - in_flight]
            if ended.all():
                break
    if pending and not ended.all():
        read(pending)
    return out


def check_prompts(
    model: GPT, prompts: Sequence[Sequence[int]] | np.ndarray | Array, max_new_tokens: int, eot_id: int = EOT_ID
) -> list[list[int]]:
    """Prompts as lists of ints (an empty one becomes [eot_id]), checked against the model's context."""
    config = model.config
    prompts = [[int(t) for t in np.asarray(p).reshape(-1)] or [eot_id] for p in prompts]
    if not prompts:
        raise UserError("no prompts given")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    bad = sorted({t for p in prompts for t in p if not 0 <= t < config.vocab_size})
    if bad:
        raise UserError(f"token ids outside the model's vocabulary [0, {config.vocab_size}): {bad[:5]}")
    longest = max(len(p) for p in prompts)
    if longest >= config.block_size:
        raise UserError(
            f"the prompt is {longest} tokens but the model's context (block_size) is {config.block_size}, "
            f"leaving no room for new tokens; shorten it (prompts are not cropped silently)"
        )
    if longest + max_new_tokens > config.block_size:
        raise UserError(
            f"a {longest}-token prompt plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{config.block_size} (block_size); ask for at most {config.block_size - longest} new tokens"
        )
    return prompts
