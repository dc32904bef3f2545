"""The fused head + cross-entropy against the plain path: logits materialised, then losses.cross_entropy;
alone, and as GPTConfig.loss through the model, the train loss and the evaluation scorer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.eval.scoring import RowScorer
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.fused_loss import _logsumexp, fused_token_log_probs, fused_weighted_nll
from jaxgpt.model.gpt import GPT
from jaxgpt.model.losses import cross_entropy, mean_weights, model_loss, resolve_loss, token_log_probs

VOCAB, PADDED, C = 100, 128, 32


def _plain_logits(h, embedding):
    """GPT.logits: the tied head in the compute dtype, float32 out, padded ids masked."""
    logits = jnp.einsum("btc,vc->btv", h, embedding.astype(h.dtype)).astype(jnp.float32)
    return jnp.where(jnp.arange(PADDED) < VOCAB, logits, jnp.finfo(jnp.float32).min)


def _inputs(batch, seq_len, dtype, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k1, (batch, seq_len, C)).astype(dtype)
    embedding = 0.3 * jax.random.normal(k2, (PADDED, C))
    targets = jax.random.randint(k3, (batch, seq_len), 0, VOCAB)
    weights = (jax.random.uniform(k4, (batch, seq_len)) > 0.3).astype(jnp.float32)
    return h, embedding, targets, weights


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _loss_and_grads(fn, h, embedding):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h, embedding)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_loss_and_grads_match_plain_path(dtype, tol, weighted):
    # 13 positions in tiles of 4 (chunk_tokens=12 over batch 3): the last tile is padded.
    h, embedding, targets, weights = _inputs(3, 13, dtype)
    w = weights if weighted else None
    fused = lambda h, e: fused_weighted_nll(h, e, targets, VOCAB, mean_weights(targets.shape, w), chunk_tokens=12)
    plain = lambda h, e: cross_entropy(_plain_logits(h, e), targets, w)
    (loss, (gh, ge)), (ref_loss, (ref_gh, ref_ge)) = (
        _loss_and_grads(fused, h, embedding),
        _loss_and_grads(plain, h, embedding),
    )
    assert gh.dtype == h.dtype and ge.dtype == embedding.dtype
    loss_tol = 1e-5 if dtype == jnp.float32 else 1e-3
    assert abs(float(loss) - float(ref_loss)) <= loss_tol * abs(float(ref_loss))
    assert _rel(gh, ref_gh) < tol and _rel(ge, ref_ge) < tol
    assert np.all(np.asarray(ge[VOCAB:]) == 0), "padded vocabulary rows must get no gradient"


def test_token_log_probs_match_plain_path():
    h, embedding, targets, _ = _inputs(2, 7, jnp.float32, seed=1)
    fused = fused_token_log_probs(h, embedding, targets, VOCAB, chunk_tokens=4)
    np.testing.assert_allclose(fused, token_log_probs(_plain_logits(h, embedding), targets), rtol=1e-5, atol=1e-6)


def test_gradient_scales_with_the_cotangent():
    # The backward pass only scales the gradients computed forward: 3 * loss must give 3 * grads.
    h, embedding, targets, _ = _inputs(2, 8, jnp.float32, seed=2)
    mean = lambda h, e: fused_weighted_nll(h, e, targets, VOCAB, mean_weights(targets.shape))
    grads = lambda s: jax.grad(lambda h, e: s * mean(h, e), argnums=(0, 1))(h, embedding)
    (g1h, g1e), (g3h, g3e) = grads(1.0), grads(3.0)
    np.testing.assert_allclose(g3h, 3 * g1h, rtol=1e-6)
    np.testing.assert_allclose(g3e, 3 * g1e, rtol=1e-6)


def _tiny_gpts(**options):
    """The same tiny GPT (vocabulary padded 100 -> 128) with the plain and the fused loss."""
    config = GPTConfig(
        n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB, pad_vocab_multiple=64, **options
    )
    plain = GPT(config.replace(loss="plain"), nnx.Rngs(0))
    fused = GPT(config.replace(loss="fused"), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (4, 16), 0, VOCAB)
    return plain, fused, tokens


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": False}], ids=["tied", "untied"])
def test_train_loss_and_grads_match_plain_path_through_the_model(options):
    plain, fused, tokens = _tiny_gpts(**options)
    assert resolve_loss(plain.config, "cpu") == "plain" and resolve_loss(fused.config, "cpu") == "fused"

    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: model_loss(m, tokens[:, :-1], tokens[:, 1:]))(model)

    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(fused), loss_and_grads(plain)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * float(ref_loss)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert _rel(got, want) < 1e-5


def test_scoring_matches_plain_path():
    plain, fused, tokens = _tiny_gpts()
    inputs, targets = np.asarray(tokens[:, :-1]), np.asarray(tokens[:, 1:])
    weights = np.ones(inputs.shape, np.float32)
    weights[:, :5] = 0
    np.testing.assert_allclose(
        RowScorer(fused)(inputs, targets, weights), RowScorer(plain)(inputs, targets, weights), rtol=1e-5
    )


def test_one_pass_logsumexp_matches_two_pass():
    """The variadic (max, sum) reduction against jax.nn.logsumexp, masked entries and large logits included."""
    logits = 30.0 * jax.random.normal(jax.random.key(3), (4, 7, 1000))
    logits = logits.at[..., 900:].set(jnp.finfo(jnp.float32).min).at[0, 0, 5].set(1e4)
    np.testing.assert_allclose(_logsumexp(logits), jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)
