"""The output head's logits and their log-sum-exp in one pass: a Pallas (Triton) kernel for the GPU.

With XLA the fused loss writes each tile's logits from a matmul, then reads them all back for the
log-sum-exp (``fused_loss._logsumexp``). This kernel computes the logits block by block, stores each
block and folds it into a running (max, sum of exps) per token while it is still on chip, as flash
attention does with its scores: the read for the log-sum-exp (about 0.1 MB a token for GPT-2's
vocabulary) is gone. The rest of the fused loss is unchanged.

Numerics follow the XLA path: logits rounded to the compute dtype, padded-vocabulary entries set to
the dtype's minimum, the log-sum-exp in float32 from the rounded logits. On the CPU it runs with
``interpret=True`` (tests); ``jaxgpt.plan`` compiles it for the GPU target. To XLA's partitioner the
kernel is one opaque custom call, so on a mesh it runs inside ``shard_map`` over the runtime's mesh
(``jaxgpt.core.platform.Runtime``: the train step's), each device on its own rows of the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec

from jaxgpt.core.platform import Runtime
from jaxgpt.core.sharding import rows_spec

BLOCK_TOKENS, BLOCK_VOCAB, BLOCK_EMBD = 64, 128, 128  # Triton tiles are powers of two


def head_logits(h: jax.Array, embedding: jax.Array, vocab_size: int, runtime: Runtime) -> tuple[jax.Array, jax.Array]:
    """``h`` [B, t, C] to logits [B, t, Vp] and their log-sum-exp [B, t], each device on its batch rows."""
    interpret = runtime.platform != "gpu"

    def local(h: jax.Array, embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, t, c = h.shape
        logits, lse = logits_and_logsumexp(h.reshape(b * t, c), embedding, vocab_size, interpret)
        return logits.reshape(b, t, -1), lse.reshape(b, t)

    mesh = runtime.mesh
    if mesh is None:
        return local(h, embedding)
    spec = rows_spec(mesh, h.shape[0])
    shard = jax.shard_map(local, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=(spec, spec), check_vma=False)
    return shard(h, embedding)


def fits(h_shape: tuple[int, ...], padded_vocab: int, runtime: Runtime) -> bool:
    """Whether ``head_logits`` can take a [B, t, C] tile: its rows on one device tile evenly, and a batch
    spread over several devices is split by the runtime's mesh (XLA could not split the kernel)."""
    b, t, c = h_shape
    mesh = runtime.mesh
    if mesh is None:
        return runtime.single_device and supported(b * t, padded_vocab, c)
    rows_axis = rows_spec(mesh, b)[0]
    local_rows = b // mesh.shape[rows_axis] if rows_axis else b
    return supported(local_rows * t, padded_vocab, c)


def supported(n_tokens: int, padded_vocab: int, n_embd: int) -> bool:
    """Whether the shapes tile evenly (GPT-2's vocabulary padded to 50304 does, 50257 does not)."""
    return n_tokens % BLOCK_TOKENS == 0 and padded_vocab % BLOCK_VOCAB == 0 and n_embd % BLOCK_EMBD == 0


def _kernel(h_ref, embedding_ref, logits_ref, lse_ref, *, vocab_size: int):
    n_embd = h_ref.shape[-1]
    low = jnp.finfo(logits_ref.dtype).min

    def over_vocab(j, carry):
        top, total = carry
        rows = pl.ds(j * BLOCK_VOCAB, BLOCK_VOCAB)
        acc = jnp.zeros((BLOCK_TOKENS, BLOCK_VOCAB), jnp.float32)
        for k in range(n_embd // BLOCK_EMBD):
            cols = pl.ds(k * BLOCK_EMBD, BLOCK_EMBD)
            acc += pl.dot(h_ref[:, cols], embedding_ref[rows, cols], trans_b=True)
        valid = (j * BLOCK_VOCAB + jnp.arange(BLOCK_VOCAB) < vocab_size)[None, :]
        logits = jnp.where(valid, acc, low).astype(logits_ref.dtype)
        logits_ref[:, rows] = logits
        x = logits.astype(jnp.float32)
        new_top = jnp.maximum(top, x.max(axis=1))
        total = total * jnp.exp(top - new_top) + jnp.exp(x - new_top[:, None]).sum(axis=1)
        return new_top, total

    start = (jnp.full((BLOCK_TOKENS,), low, jnp.float32), jnp.zeros((BLOCK_TOKENS,), jnp.float32))
    top, total = jax.lax.fori_loop(0, embedding_ref.shape[0] // BLOCK_VOCAB, over_vocab, start)
    lse_ref[...] = top + jnp.log(total)


@functools.partial(jax.jit, static_argnames=("vocab_size", "interpret"))
def logits_and_logsumexp(
    h: jax.Array, embedding: jax.Array, vocab_size: int, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``h`` [N, C] and the head ``embedding`` [Vp, C], both in the compute dtype, to the logits
    [N, Vp] (that dtype; ids >= ``vocab_size`` at its minimum) and their float32 log-sum-exp [N]."""
    (n, c), (v, _) = h.shape, embedding.shape
    assert supported(n, v, c) and embedding.dtype == h.dtype, (h.shape, embedding.shape, h.dtype, embedding.dtype)
    return pl.pallas_call(
        functools.partial(_kernel, vocab_size=vocab_size),
        grid=(n // BLOCK_TOKENS,),
        in_specs=[pl.BlockSpec((BLOCK_TOKENS, c), lambda i: (i, 0)), pl.BlockSpec((v, c), lambda i: (0, 0))],
        out_specs=[pl.BlockSpec((BLOCK_TOKENS, v), lambda i: (i, 0)), pl.BlockSpec((BLOCK_TOKENS,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((n, v), h.dtype), jax.ShapeDtypeStruct((n,), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="head_logits_logsumexp",
    )(h, embedding)
