"""Flash attention on TPU: JAX's Pallas splash-attention kernel, sharded like the rest of the step.

``jax.experimental.pallas.ops.tpu.splash_attention`` (maintained with JAX, the kernel MaxText uses on
TPU) computes causal attention block by block in on-chip memory: the [T, T] scores and weights never
reach HBM, in the forward pass or the backward. To XLA's partitioner a Pallas kernel is one opaque
custom call, so on a mesh it runs inside ``shard_map`` over the runtime's mesh (the train step's),
each device attending its own batch rows and heads (``jaxgpt.core.sharding.attention_spec``);
without one, only on a single device. Off TPU the same kernel runs in Pallas' interpreter: slow,
for tests only. No dropout on the attention weights (``jaxgpt.model.gpt.resolve_attention`` falls
back to XLA's attention).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxgpt.core.platform import Runtime
from jaxgpt.core.sharding import attention_spec

BLOCKS = (512, 256, 128)  # tokens per query/key block, largest first (512: MaxText's default)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, runtime: Runtime) -> jax.Array:
    """Causal softmax attention of ``q, k, v`` [B, T, H, D], as ``jax.nn.dot_product_attention(is_causal=True)``.

    XLA's attention runs instead for a sequence that no block tiles (T not a multiple of 128, the
    kernel's lane width), and on several devices without the runtime's mesh: the kernel could not be
    split, and XLA cannot split it either.
    """
    attend = functools.partial(_attend, interpret=runtime.platform != "tpu")
    if splash_block(q.shape[1]) is None or (runtime.mesh is None and not runtime.single_device):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    if runtime.mesh is None:
        return attend(q, k, v)
    spec = attention_spec(runtime.mesh, q.shape[0], q.shape[2])
    shard = jax.shard_map(attend, mesh=runtime.mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return shard(q, k, v)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
    """One device's share: the kernel per batch row on [H, T, D] (the kernel leaves the 1/sqrt(D) to us)."""
    _, t, h, d = q.shape
    kernel = _kernel(h, t, interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    q = q * jnp.asarray(1 / math.sqrt(d), q.dtype)
    return heads_first(jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v)))


@functools.cache
def _kernel(heads: int, seq_len: int, interpret: bool) -> splash.splash_attention_kernel.SplashAttentionKernel:
    block = splash_block(seq_len)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_block(seq_len: int) -> int | None:
    """The query/key block: the largest of 512, 256, 128 tokens that tiles the sequence, if any."""
    return next((b for b in BLOCKS if seq_len % b == 0), None)
