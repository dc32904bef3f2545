"""The model's own invariants; numerical parity with transformers lives in test_convert.py."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.core.errors import UserError
from jaxgpt.model.config import GPTConfig, preset
from jaxgpt.model.gpt import GPT, count_params, explicit_attention, gelu_new, resolve_attention
from jaxgpt.model.losses import cross_entropy

TINY = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=32)


@pytest.mark.parametrize(
    "name, expected",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts_equal_gpt2(name, expected):
    for pad in (1, 64):  # padding rows are not parameters of GPT-2
        model = nnx.eval_shape(lambda: GPT(preset(name, pad_vocab_multiple=pad), nnx.Rngs(0)))  # noqa: B023
        assert count_params(model) == expected


def test_gpt2_initialisation():
    config = GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config, nnx.Rngs(0))
    block = model.h[0]
    assert abs(float(jnp.std(model.wte.embedding[...])) - 0.02) < 1e-3
    assert abs(float(jnp.std(block.mlp.c_fc.kernel[...])) - 0.02) < 1e-3
    scaled = 0.02 / math.sqrt(2 * config.n_layer)
    assert abs(float(jnp.std(block.mlp.c_proj.kernel[...])) - scaled) < 1e-3
    assert abs(float(jnp.std(block.attn.c_proj.kernel[...])) - scaled) < 1e-3
    assert float(jnp.abs(block.attn.c_attn.bias[...]).max()) == 0.0
    assert float(jnp.abs(block.ln_1.scale[...] - 1).max()) == 0.0
    assert block.ln_1.epsilon == 1e-5


def test_causal_future_tokens_do_not_change_past_logits():
    model = GPT(TINY, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 100)
    changed = tokens.at[:, 20:].set((tokens[:, 20:] + 1) % 100)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :20], b[:, :20], atol=1e-6)
    assert np.abs(np.asarray(a[:, 20:] - b[:, 20:])).max() > 1e-3


def test_padded_vocab_never_reaches_loss_or_argmax():
    padded = GPT(TINY.replace(pad_vocab_multiple=64), nnx.Rngs(0))
    assert padded.config.padded_vocab_size == 128
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 100)
    logits = padded(tokens)
    assert logits.shape == (2, 32, 128)
    assert int(logits.argmax(-1).max()) < 100
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(probs[..., 100:].max()) == 0.0
    loss_padded = cross_entropy(logits[:, :-1], tokens[:, 1:])
    loss_unpadded = cross_entropy(logits[:, :-1, :100], tokens[:, 1:])
    assert abs(float(loss_padded) - float(loss_unpadded)) < 1e-6


def test_dropout_only_with_a_key():
    model = GPT(TINY.replace(dropout=0.2), nnx.Rngs(0))
    tokens = jnp.zeros((1, 16), jnp.int32)
    np.testing.assert_array_equal(model(tokens), model(tokens))
    a = model(tokens, dropout_key=jax.random.key(1))
    b = model(tokens, dropout_key=jax.random.key(2))
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(a, model(tokens, dropout_key=jax.random.key(1)))


def test_explicit_attention_path_equals_fused_kernel():
    q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 16, 4, 8))
    fused = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    explicit = explicit_attention(q, k, v, 0.0, jax.random.key(0))  # rate 0: no weights dropped
    np.testing.assert_allclose(explicit, fused, atol=1e-5)


def test_remat_gives_the_same_loss_and_gradients():
    tokens = jax.random.randint(jax.random.key(4), (2, 32), 0, 100)

    def loss_and_grads(config):
        model = GPT(config, nnx.Rngs(0))
        return nnx.value_and_grad(lambda m: cross_entropy(m(tokens)[:, :-1], tokens[:, 1:]))(model)

    loss, grads = loss_and_grads(TINY)
    loss_r, grads_r = loss_and_grads(TINY.replace(remat=True))
    assert float(loss) == pytest.approx(float(loss_r), abs=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(g, g_r, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    model = GPT(TINY.replace(dtype="bfloat16"), nnx.Rngs(0))
    assert model.wte.embedding[...].dtype == jnp.float32
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32
    reference = GPT(TINY, nnx.Rngs(0))(jnp.zeros((1, 8), jnp.int32))
    assert np.abs(np.asarray(logits - reference)).max() < 0.05


def test_cudnn_request_falls_back_on_cpu_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_attention(TINY.replace(attention="cudnn", dtype="bfloat16"), "cpu") == "xla"
    assert any("falling back" in str(w.message) for w in caught)
    assert resolve_attention(TINY.replace(attention="auto"), "cpu") == "xla"


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(AssertionError, match="block_size"):
        GPT(TINY, nnx.Rngs(0))(jnp.zeros((1, 33), jnp.int32))


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.0)])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        TINY.replace(**bad)


def test_gelu_new_value_and_gradients_equal_autodiff():
    """The hand-written backward pass (recomputing from the matmul's output) against autodiff of the same GELU."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    product, bias = 3 * jax.random.normal(k1, (2, 5, 16)), jax.random.normal(k2, (16,))
    cotangent = jax.random.normal(k3, product.shape)
    reference = lambda p, b: jax.nn.gelu(p + b, approximate=True)
    ours, ours_vjp = jax.vjp(gelu_new, product, bias)
    expected, expected_vjp = jax.vjp(reference, product, bias)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    for got, want in zip(ours_vjp(cotangent), expected_vjp(cotangent), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
