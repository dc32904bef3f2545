"""The Pallas head kernel (logits + log-sum-exp in one pass) against XLA, in Pallas' interpreter on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.head_kernel import logits_and_logsumexp, supported


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
