"""GPT-2 in Flax NNX, read top-down: attention, MLP, block, GPT; the small helpers they use come last.

The architecture is OpenAI's GPT-2 exactly: learned position embeddings,
pre-LayerNorm blocks (eps 1e-5), causal multi-head self-attention, a 4x MLP with
tanh-approximate GELU, a final LayerNorm and an output head tied to the token
embedding. Submodule names follow Hugging Face's (``h.0.attn.c_attn``...), so the
converter is a rename. Every parameter carries logical axis names
(``vocab``, ``embed``, ``heads``, ``mlp``) as metadata; ``jaxgpt.core.sharding`` maps
them to mesh axes, so the model never mentions a device.

That is the default. ``GPTConfig``'s architecture options give modded-nanogpt's
variant instead: rotary positions (no ``wpe``), RMSNorm with or without scale,
QK-norm, a ReLU² MLP, an untied ``lm_head``, no biases, zero-initialised output
projections and a logit soft-cap.

Dropout is functional: pass ``dropout_key`` to train with dropout; without one
the model is deterministic (inference). Generation with a KV cache lives in
``jaxgpt.model.decoding``, which reuses these modules' pieces (``qkv`` applies QK-norm
and rotary for both paths).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.core.platform import Runtime, local_runtime
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.kernels.tpu_attention import splash_attention, splash_block

Array = jax.Array


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention: ``c_attn`` projects to queries, keys and values per head, a kernel
    the runtime picks attends, ``c_proj`` maps back to the residual stream; QK-norm and rotary if configured."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        c, h, d = config.n_embd, config.n_head, config.head_dim
        # Heads get their own kernel axis so tensor parallelism splits whole heads (Megatron-style).
        self.c_attn = nnx.LinearGeneral(c, (3, h, d), **_dense(config, 0.02, ("embed", None, "heads", None), rngs))
        self.c_proj = nnx.LinearGeneral(
            (h, d), c, axis=(-2, -1), **_dense(config, None, ("heads", None, "embed"), rngs)
        )
        # QK-norm: one RMSNorm over the head size for queries, one for keys (shared by all heads).
        self.q_norm = _norm(config, d, (None,), "rmsnorm", rngs) if config.qk_norm else None
        self.k_norm = _norm(config, d, (None,), "rmsnorm", rngs) if config.qk_norm else None
        self.rope_base = config.rope_base if config.position_embedding == "rotary" else None
        self.dropout = config.dropout
        self.config = config

    def qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """Queries, keys and values [B, T, H, D]; QK-normed and rotated to ``positions`` [B|1, T] if configured."""
        q, k, v = jnp.unstack(self.c_attn(x), axis=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base is not None:
            q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        return q, k, v

    def __call__(self, x: Array, positions: Array, dropout_key: Array | None, runtime: Runtime) -> Array:
        q, k, v = self.qkv(x, positions)
        attn_key, resid_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        implementation = resolve_attention(self.config, runtime.platform)
        if attn_key is not None and self.dropout > 0:  # the fused kernels have no dropout on the weights
            y = explicit_attention(q, k, v, self.dropout, attn_key)
        elif implementation == "splash":
            y = splash_attention(q, k, v, runtime)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
        return _dropout(self.c_proj(y), self.dropout, resid_key)


class MLP(nnx.Module):
    """The feed-forward branch: n_embd -> 4 n_embd (GPT-2's tanh GELU, or ReLU²) -> n_embd, dropout on its output."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        c = config.n_embd
        self.c_fc = nnx.Linear(c, 4 * c, **_dense(config, 0.02, ("embed", "mlp"), rngs))
        self.c_proj = nnx.Linear(4 * c, c, **_dense(config, None, ("mlp", "embed"), rngs))
        self.relu2 = config.activation == "relu2"
        self.dropout = config.dropout

    def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
        # ReLU², or GPT-2's "gelu_new" with c_fc's bias added inside it (see gelu_new)
        h = jnp.square(jax.nn.relu(self.c_fc(x))) if self.relu2 else gelu_new(*_product_and_bias(self.c_fc, x))
        return _dropout(self.c_proj(h), self.dropout, dropout_key)


class Block(nnx.Module):
    """One pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.ln_1 = _norm(config, config.n_embd, ("embed",), config.norm, rngs)
        self.attn = CausalSelfAttention(config, rngs)
        self.ln_2 = _norm(config, config.n_embd, ("embed",), config.norm, rngs)
        self.mlp = MLP(config, rngs)

    def __call__(self, x: Array, positions: Array, dropout_key: Array | None, runtime: Runtime) -> Array:
        attn_key, mlp_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = x + self.attn(self.ln_1(x), positions, attn_key, runtime)
        return x + self.mlp(self.ln_2(x), mlp_key)


class GPT(nnx.Module):
    """GPT-2: token (and, unless rotary, position) embeddings, ``n_layer`` blocks, a final norm and the output head,
    tied to the token embedding unless ``tie_embeddings`` is off. Calling it gives logits; ``features`` the hidden
    states the fused loss reads instead."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.config = config
        c, dtypes = config.n_embd, dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.wte = nnx.Embed(
            config.padded_vocab_size, c, embedding_init=_init(0.02, ("vocab", "embed")), rngs=rngs, **dtypes
        )
        self.wpe = (
            nnx.Embed(config.block_size, c, embedding_init=_init(0.02, (None, "embed")), rngs=rngs, **dtypes)
            if config.position_embedding == "learned"
            else None  # rotary: positions enter in the attention
        )
        self.h = nnx.List([Block(config, rngs) for _ in range(config.n_layer)])
        self.ln_f = _norm(config, c, ("embed",), config.norm, rngs)
        self.lm_head = None if config.tie_embeddings else _untied_head(config, rngs)

    def __call__(self, tokens: Array, **options: Any) -> Array:
        """Float32 logits [B, T, padded_vocab] of the next token at every position (causal); ``options``
        (positions, dropout_key, runtime) as :meth:`features` takes them."""
        return self.logits(self.features(tokens, **options))

    def features(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        dropout_key: Array | None = None,
        runtime: Runtime | None = None,
    ) -> Array:
        """The final hidden states [B, T, n_embd] (after ln_f) that the output head reads; ``runtime``
        (default: this machine, one device) picks the attention kernel."""
        runtime = runtime or local_runtime()
        t = tokens.shape[1]
        assert t <= self.config.block_size, f"sequence length {t} > block_size {self.config.block_size}"
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)[None, :]
        keys = [None] * (self.config.n_layer + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, self.config.n_layer + 1))
        x = _dropout(self.embed(tokens, positions), self.config.dropout, keys[-1])
        for block, key in zip(self.h, keys, strict=False):
            if self.config.remat:
                x = nnx.remat(lambda blk, x, p, k: blk(x, p, k, runtime))(block, x, positions, key)
            else:
                x = block(x, positions, key, runtime)
        return self.ln_f(x)

    def embed(self, tokens: Array, positions: Array) -> Array:
        """The first block's input: token embeddings plus learned position embeddings (rotary adds none here)."""
        return self.wte(tokens) if self.wpe is None else self.wte(tokens) + self.wpe(positions)

    def logits(self, features: Array) -> Array:
        """Float32 logits from final hidden states; the padded vocabulary entries can never win or be sampled."""
        head = self.wte.attend if self.lm_head is None else self.lm_head
        logits = head(features).astype(jnp.float32)
        if self.config.logit_softcap:
            logits = self.config.logit_softcap * jnp.tanh(logits / self.config.logit_softcap)
        if self.config.padded_vocab_size == self.config.vocab_size:
            return logits
        return mask_logits(logits, jnp.arange(self.config.padded_vocab_size) < self.config.vocab_size)


def count_params(model: GPT, *, exclude_padding: bool = True) -> int:
    """Parameters, with a tied head counted once (GPT-2 124M: 124,439,808)."""
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    if exclude_padding:
        c = model.config
        tables = 1 if c.tie_embeddings else 2  # the embedding, and an untied head
        total -= tables * (c.padded_vocab_size - c.vocab_size) * c.n_embd
    return total


def non_embedding_params(model: GPT) -> int:
    """The N in the 6N FLOPs-per-token estimate: parameters that take part in matmuls, as in nanoGPT.

    Embedding lookups cost no FLOPs: a learned position table is excluded, and so is the token
    embedding when an untied ``lm_head`` does the output matmul (a tied one is that matmul).
    """
    c = model.config
    lookups = c.block_size * c.n_embd if c.position_embedding == "learned" else 0
    if not c.tie_embeddings:
        lookups += c.vocab_size * c.n_embd
    return count_params(model) - lookups


def rotary(x: Array, positions: Array, base: float) -> Array:
    """Rotary embedding of ``x`` [B, T, H, D] at ``positions`` [B|1, T] (half-split pairs, as GPT-NeoX/Llama)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def resolve_attention(config: GPTConfig, platform: str) -> str:
    """The attention kernel to use on ``platform``: cuDNN flash attention needs a GPU and 16-bit compute;
    splash flash attention (``kernels/tpu_attention.py``) is picked on a TPU, for a multiple of 128
    positions, without dropout."""
    cudnn_ok = platform == "gpu" and config.dtype in ("bfloat16", "float16") and config.head_dim <= 128
    if config.attention == "cudnn" and not cudnn_ok:
        warnings.warn(
            f"attention='cudnn' needs a GPU and bfloat16/float16 compute (backend "
            f"{platform}, dtype {config.dtype}); falling back to 'xla'",
            stacklevel=2,
        )
        return "xla"
    if config.attention == "splash" and config.dropout > 0:
        warnings.warn(
            f"attention='splash' has no dropout on the attention weights (dropout {config.dropout}); "
            "falling back to 'xla'",
            stacklevel=2,
        )
        return "xla"
    if config.attention == "auto":
        if cudnn_ok:
            return "cudnn"
        splash_ok = platform == "tpu" and config.dropout == 0 and splash_block(config.block_size) is not None
        return "splash" if splash_ok else "xla"
    return config.attention


def explicit_attention(q: Array, k: Array, v: Array, dropout: float, key: Array) -> Array:
    """Causal softmax attention written out, with dropout on the weights (float32 scores and softmax)."""
    t = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = mask_logits(scores, jnp.tril(jnp.ones((t, t), bool)))
    weights = _dropout(jax.nn.softmax(scores, axis=-1), dropout, key).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def mask_logits(logits: Array, keep: Array) -> Array:
    """``logits`` where ``keep`` (broadcast), else float32's lowest: finite, so a softmax row never turns NaN."""
    return jnp.where(keep, logits, jnp.finfo(jnp.float32).min)


# --- Initialisers: GPT-2's normal(0.02), residual projections scaled by 1/sqrt(2 n_layer) (or zero), zero biases. ---


def _init(std: float, axes: tuple[str | None, ...]):
    """Normal(0, std) init that records the logical axes (applied later by jaxgpt.sharding)."""
    return nnx.with_partitioning(nnx.initializers.normal(std), axes, eager_sharding=False)


def _constant(init, axes: tuple[str | None, ...]):
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _dense(config: GPTConfig, std: float | None, kernel_axes: tuple[str | None, ...], rngs: nnx.Rngs) -> dict:
    """Keyword arguments of a projection; ``std=None`` marks a residual output projection (scaled down or zero)."""
    if std is None and config.zero_init_proj:
        kernel_init = _constant(nnx.initializers.zeros_init(), kernel_axes)
    else:
        kernel_init = _init(0.02 / math.sqrt(2 * config.n_layer) if std is None else std, kernel_axes)
    # A projection reads the residual stream (embed first) or writes it (embed last); the bias is the output's.
    bias_axes = kernel_axes[1:] if kernel_axes[0] == "embed" else ("embed",)
    return dict(
        use_bias=config.bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=kernel_init,
        bias_init=_constant(nnx.initializers.zeros_init(), bias_axes),
        rngs=rngs,
    )


def _untied_head(config: GPTConfig, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.initializers.zeros_init() if config.zero_init_proj else nnx.initializers.normal(0.02)
    return nnx.Linear(
        config.n_embd,
        config.padded_vocab_size,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=_constant(init, ("embed", "vocab")),
        rngs=rngs,
    )


def _norm(
    config: GPTConfig, features: int, axes: tuple[str | None, ...], kind: str, rngs: nnx.Rngs
) -> nnx.LayerNorm | nnx.RMSNorm:
    """A LayerNorm or RMSNorm over the last axis; scale and bias only where the config keeps them."""
    common = dict(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        use_scale=config.norm_scale,
        scale_init=_constant(nnx.initializers.ones_init(), axes),
        rngs=rngs,
    )
    if kind == "rmsnorm":
        return nnx.RMSNorm(features, **common)
    bias_init = _constant(nnx.initializers.zeros_init(), axes)
    return nnx.LayerNorm(features, use_bias=config.bias, bias_init=bias_init, **common)


def _product_and_bias(linear: nnx.Linear, x: Array) -> tuple[Array, Array]:
    """``linear(x)`` in two parts, ``x @ kernel`` and the bias (0 without one), in the layer's dtype."""
    bias = linear.bias.value if linear.bias is not None else jnp.zeros(())
    return x.astype(linear.dtype) @ linear.kernel.value.astype(linear.dtype), bias.astype(linear.dtype)


@jax.custom_vjp
def gelu_new(product: Array, bias: Array) -> Array:
    """GPT-2's tanh-approximate GELU of ``product + bias``, for less memory traffic than autodiff's.

    Autodiff would store the biased pre-activation and an intermediate of the tanh beside the output:
    two more [tokens, 4C] tensors written, and read back, per layer. Here the backward pass recomputes
    both from the matmul's output (a few element-wise FLOPs inside its fused kernel).
    """
    return jax.nn.gelu(product + bias, approximate=True)


def _gelu_new_fwd(product: Array, bias: Array) -> tuple[Array, tuple[Array, Array]]:
    return gelu_new(product, bias), (product, bias)


def _gelu_new_bwd(residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
    # The barrier keeps XLA from merging the recomputed tanh with the forward's (and storing it).
    product, bias = jax.lax.optimization_barrier(residuals)
    return jax.vjp(lambda p, b: jax.nn.gelu(p + b, approximate=True), product, bias)[1](grad)


gelu_new.defvjp(_gelu_new_fwd, _gelu_new_bwd)


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
