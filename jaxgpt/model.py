"""GPT-2 in Flax NNX, read top-down: attention, MLP, block, GPT.

The architecture is OpenAI's GPT-2 exactly: learned position embeddings,
pre-LayerNorm blocks (eps 1e-5), causal multi-head self-attention, a 4x MLP with
tanh-approximate GELU, a final LayerNorm and an output head tied to the token
embedding. Submodule names follow Hugging Face's (``h.0.attn.c_attn``...), so the
converter is a rename. Every parameter carries logical axis names
(``vocab``, ``embed``, ``heads``, ``mlp``) as metadata; ``jaxgpt.sharding`` maps
them to mesh axes, so the model never mentions a device.

Dropout is functional: pass ``dropout_key`` to train with dropout; without one
the model is deterministic (inference).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import GPTConfig

Array = jax.Array
# Parameters name each dimension with a logical axis: "vocab", "embed", "heads", "mlp" (None: never sharded).


def _init(std: float, axes: tuple[str | None, ...]):
    """Normal(0, std) init that records the logical axes (applied later by jaxgpt.sharding)."""
    return nnx.with_partitioning(nnx.initializers.normal(std), axes, eager_sharding=False)


def _zeros(axes: tuple[str | None, ...]):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), axes, eager_sharding=False)


def _layer_norm(config: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.n_embd,
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",), eager_sharding=False),
        bias_init=_zeros(("embed",)),
        rngs=rngs,
    )


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def resolve_attention(config: GPTConfig) -> str:
    """The attention kernel to use: cuDNN flash attention needs a GPU and 16-bit compute."""
    on_gpu = jax.default_backend() == "gpu"
    supported = on_gpu and config.dtype in ("bfloat16", "float16") and config.head_dim <= 128
    if config.attention == "cudnn" and not supported:
        warnings.warn(
            f"attention='cudnn' needs a GPU and bfloat16/float16 compute (backend "
            f"{jax.default_backend()}, dtype {config.dtype}); falling back to 'xla'",
            stacklevel=2,
        )
        return "xla"
    if config.attention == "auto":
        return "cudnn" if supported else "xla"
    return config.attention


class KVCache(NamedTuple):
    """One layer's keys [batch, heads, head_dim, max_len] (transposed) and values [batch, heads, max_len, head_dim].

    In these layouts both attention products of a decode step are plain batched matmuls; in the
    usual [batch, heads, max_len, head_dim] for keys, XLA:CPU transposes the cache every step.
    """

    key: Array
    value: Array


def _cached_attention(
    q: Array, k: Array, v: Array, cache: KVCache, cache_index: Array | int, mask: Array
) -> tuple[Array, KVCache]:
    """Attention of a chunk's q, k, v [B, T, H, D] placed at cache slots cache_index..+T; returns y and the new cache.

    ``mask`` [B, 1, T, S] says which cache slots each query sees. The chunk's own keys are scored
    apart from the cache, which is read first and updated in place last: read after the update,
    XLA:CPU keeps a copy of every layer's cache each step (jaxgpt.sampling compiles so that, read
    before, it keeps none). Scores and softmax are float32.
    """
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
    scores = jnp.where(visible, scores / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhts,bhsd->bthd", weights[..., :s], cache.value.astype(v.dtype))
    y += jnp.einsum("bhts,bshd->bthd", weights[..., s:], v)
    zero = jnp.zeros((), jnp.int32)
    keys = jnp.transpose(k, (0, 2, 3, 1)).astype(cache.key.dtype)  # [B, H, D, T]
    values = jnp.transpose(v, (0, 2, 1, 3)).astype(cache.value.dtype)  # [B, H, T, D]
    return y, KVCache(
        jax.lax.dynamic_update_slice(cache.key, keys, (zero, zero, zero, index)),
        jax.lax.dynamic_update_slice(cache.value, values, (zero, zero, index, zero)),
    )


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        c, h, d = config.n_embd, config.n_head, config.head_dim
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: residual projections scaled down
        # Heads get their own kernel axis so tensor parallelism splits whole heads (Megatron-style).
        self.c_attn = nnx.LinearGeneral(
            c, (3, h, d), dtype=config.dtype, param_dtype=config.param_dtype,
            kernel_init=_init(0.02, ("embed", None, "heads", None)),
            bias_init=_zeros((None, "heads", None)), rngs=rngs,
        )  # fmt: skip
        self.c_proj = nnx.LinearGeneral(
            (h, d), c, axis=(-2, -1), dtype=config.dtype, param_dtype=config.param_dtype,
            kernel_init=_init(proj_std, ("heads", None, "embed")),
            bias_init=_zeros(("embed",)), rngs=rngs,
        )  # fmt: skip
        self.dropout = config.dropout
        self.implementation = resolve_attention(config)

    def __call__(
        self,
        x: Array,
        *,
        mask: Array | None = None,
        cache: KVCache | None = None,
        cache_index: Array | int = 0,
        dropout_key: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        q, k, v = jnp.unstack(self.c_attn(x), axis=2)  # each [B, T, H, D]
        attn_key, resid_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        if cache is not None:  # decoding: write this chunk into the cache, attend to all of it
            assert mask is not None and attn_key is None, "decoding needs a mask and has no dropout"
            y, cache = _cached_attention(q, k, v, cache, cache_index, mask)
        elif attn_key is not None and self.dropout > 0:
            y = self._attention_with_dropout(q, k, v, attn_key)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        return _dropout(self.c_proj(y), self.dropout, resid_key), cache

    def _attention_with_dropout(self, q: Array, k: Array, v: Array, key: Array) -> Array:
        """Explicit softmax attention: the fused kernels have no dropout on the weights (training only)."""
        t = q.shape[1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(jnp.float32).min)
        weights = _dropout(jax.nn.softmax(scores, axis=-1), self.dropout, key).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        c = config.n_embd
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_fc = nnx.Linear(
            c, 4 * c, dtype=config.dtype, param_dtype=config.param_dtype,
            kernel_init=_init(0.02, ("embed", "mlp")), bias_init=_zeros(("mlp",)), rngs=rngs,
        )  # fmt: skip
        self.c_proj = nnx.Linear(
            4 * c, c, dtype=config.dtype, param_dtype=config.param_dtype,
            kernel_init=_init(proj_std, ("mlp", "embed")), bias_init=_zeros(("embed",)), rngs=rngs,
        )  # fmt: skip
        self.dropout = config.dropout

    def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
        h = jax.nn.gelu(self.c_fc(x), approximate=True)  # GPT-2's "gelu_new"
        return _dropout(self.c_proj(h), self.dropout, dropout_key)


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, rngs)
        self.attn = CausalSelfAttention(config, rngs)
        self.ln_2 = _layer_norm(config, rngs)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, mask=None, cache=None, cache_index=0, dropout_key=None):
        attn_key, mlp_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        y, cache = self.attn(self.ln_1(x), mask=mask, cache=cache, cache_index=cache_index, dropout_key=attn_key)
        x = x + y
        x = x + self.mlp(self.ln_2(x), mlp_key)
        return x, cache


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.config = config
        self.wte = nnx.Embed(
            config.padded_vocab_size, config.n_embd, dtype=config.dtype, param_dtype=config.param_dtype,
            embedding_init=_init(0.02, ("vocab", "embed")), rngs=rngs,
        )  # fmt: skip
        self.wpe = nnx.Embed(
            config.block_size, config.n_embd, dtype=config.dtype, param_dtype=config.param_dtype,
            embedding_init=_init(0.02, (None, "embed")), rngs=rngs,
        )  # fmt: skip
        self.h = nnx.List([Block(config, rngs) for _ in range(config.n_layer)])
        self.ln_f = _layer_norm(config, rngs)

    def __call__(self, tokens: Array, *, positions: Array | None = None, dropout_key: Array | None = None) -> Array:
        """Float32 logits [B, T, padded_vocab] of the next token at every position (causal)."""
        t = tokens.shape[1]
        assert t <= self.config.block_size, f"sequence length {t} > block_size {self.config.block_size}"
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)[None, :]
        keys = [None] * (self.config.n_layer + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, self.config.n_layer + 1))
        x = _dropout(self.wte(tokens) + self.wpe(positions), self.config.dropout, keys[-1])
        for block, key in zip(self.h, keys, strict=False):
            if self.config.remat:
                x, _ = nnx.remat(lambda blk, x, k: blk(x, dropout_key=k))(block, x, key)
            else:
                x, _ = block(x, dropout_key=key)
        return self._logits(x)

    def decode(
        self,
        tokens: Array,
        cache: list[KVCache],
        cache_index: Array | int,
        positions: Array,
        key_mask: Array,
        *,
        last_only: bool = False,
    ) -> tuple[Array, list[KVCache]]:
        """Runs ``tokens`` [B, T] placed at cache slots ``cache_index..+T``; returns logits and the new cache.

        ``positions`` [B, T] are the tokens' position ids and ``key_mask`` [B, S] marks the cache slots that
        hold real tokens (False for padding), so prompts of different lengths share one batch.
        ``last_only`` returns the logits of the last token only ([B, 1, vocab]): a prefill needs no more,
        and the head's matmul over every prompt token would cost about a third of the prefill.
        """
        b, t = tokens.shape
        s = cache[0].value.shape[2]
        assert len(cache) == self.config.n_layer and key_mask.shape == (b, s), (len(cache), key_mask.shape)
        query_slot = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t)
        causal = jnp.arange(s)[None, :] <= query_slot[:, None]  # [T, S]
        mask = causal[None, None, :, :] & key_mask[:, None, None, :]  # [B, 1, T, S]
        x = self.wte(tokens) + self.wpe(positions)
        new_cache = []
        for block, layer_cache in zip(self.h, cache, strict=True):
            x, layer_cache = block(x, mask=mask, cache=layer_cache, cache_index=cache_index)
            new_cache.append(layer_cache)
        return self._logits(x[:, -1:] if last_only else x), new_cache

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> list[KVCache]:
        b, h, d, dtype = batch_size, self.config.n_head, self.config.head_dim, dtype or self.config.dtype
        return [
            KVCache(jnp.zeros((b, h, d, max_len), dtype), jnp.zeros((b, h, max_len, d), dtype))
            for _ in range(self.config.n_layer)
        ]

    def _logits(self, x: Array) -> Array:
        x = self.ln_f(x)
        logits = self.wte.attend(x).astype(jnp.float32)  # tied head
        if self.config.padded_vocab_size != self.config.vocab_size:  # padding ids can never win or be sampled
            valid = jnp.arange(self.config.padded_vocab_size) < self.config.vocab_size
            logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
        return logits


def count_params(model: GPT, *, exclude_padding: bool = True) -> int:
    """Parameters, with the tied head counted once (GPT-2 124M: 124,439,808)."""
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    if exclude_padding:
        c = model.config
        total -= (c.padded_vocab_size - c.vocab_size) * c.n_embd
    return total


def non_embedding_params(model: GPT) -> int:
    """The N in the 6N FLOPs-per-token estimate: position embeddings excluded, as in nanoGPT."""
    return count_params(model) - model.config.block_size * model.config.n_embd
