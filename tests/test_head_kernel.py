"""The Pallas head kernel (logits + log-sum-exp in one pass) against XLA, in Pallas' interpreter on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.core.platform import Runtime
from jaxgpt.core.sharding import make_mesh
from jaxgpt.model.fused_loss import fused_weighted_nll
from jaxgpt.model.kernels.head_kernel import logits_and_logsumexp, supported
from jaxgpt.model.losses import mean_weights


def test_logits_and_logsumexp_equal_the_xla_path():
    k1, k2 = jax.random.split(jax.random.key(0))
    tokens, padded, n_embd, vocab = 128, 384, 256, 300  # two token blocks, three vocab blocks, two embd blocks
    h = jax.random.normal(k1, (tokens, n_embd)).astype(jnp.bfloat16)
    embedding = (0.3 * jax.random.normal(k2, (padded, n_embd))).astype(jnp.bfloat16)
    logits, lse = logits_and_logsumexp(h, embedding, vocab, interpret=True)
    expected = jnp.einsum("nc,vc->nv", h, embedding, preferred_element_type=jnp.float32)
    expected = jnp.where(jnp.arange(padded) < vocab, expected, jnp.finfo(jnp.bfloat16).min).astype(jnp.bfloat16)
    # the same float32 sums in another order: at most one bfloat16 rounding step apart
    np.testing.assert_allclose(np.asarray(logits, np.float32), np.asarray(expected, np.float32), rtol=8e-3, atol=8e-3)
    assert np.all(np.asarray(logits[:, vocab:], np.float32) == float(jnp.finfo(jnp.bfloat16).min))
    reference = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # of the kernel's own rounded logits
    np.testing.assert_allclose(lse, reference, rtol=1e-6)
    assert supported(tokens, padded, n_embd) and not supported(tokens, 50257, n_embd)


def test_fused_loss_with_the_kernel_equals_without():
    """Loss and gradients of the fused cross-entropy through the kernel (interpreted on the CPU, under
    shard_map as in the train step: one batch row of 64 tokens on each of two devices) and through XLA."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(k1, (2, 64, 128)).astype(jnp.bfloat16)  # one 128-token tile
    embedding = 0.3 * jax.random.normal(k2, (256, 128))
    targets = jax.random.randint(k3, (2, 64), 0, 200)

    devices = jax.devices()[:2]  # one on a one-GPU machine (bench/gpu.sh runs this test there)
    mesh = make_mesh(f"{len(devices)}x1", devices)

    def loss_and_grads(kernel):
        runtime = Runtime("cpu", mesh) if kernel else None  # the train step's: its mesh, the kernel interpreted
        weights = mean_weights(targets.shape)
        loss = lambda h, e: fused_weighted_nll(h, e, targets, 200, weights, chunk_tokens=128, kernel=runtime)
        step = jax.value_and_grad(loss, argnums=(0, 1))
        assert ("pallas_call" in str(jax.make_jaxpr(step)(h, embedding))) == kernel
        shardings = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))
        return jax.jit(step, in_shardings=shardings)(h, embedding)

    (loss, grads), (expected_loss, expected_grads) = loss_and_grads(True), loss_and_grads(False)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2  # bfloat16 logits rounded in another order
