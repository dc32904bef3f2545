"""Splash flash attention (TPU's Pallas kernel): equal to XLA's attention, and present in a TPU plan."""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxgpt.core.platform import Runtime
from jaxgpt.core.sharding import DATA, MODEL, make_mesh
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import resolve_attention
from jaxgpt.model.kernels.tpu_attention import splash_attention
from jaxgpt.plan import report as plan
from jaxgpt.plan.hardware import get_target, target_devices
from jaxgpt.train.config import parse_run_config


def _loss_and_grads(attention):
    """An attention output and the gradients of a weighted sum of it: all that training asks of a kernel."""

    def loss(q, k, v, w):
        y = attention(q, k, v)
        return (y * w).sum(), y

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@pytest.mark.parametrize("mesh_spec", ["1x1", "2x2"])
def test_splash_equals_xla_attention_and_its_gradients(mesh_spec):
    # float32, B=4 T=128 H=4 D=16, Pallas' interpreter on the CPU, through shard_map on the step's mesh
    # (2x2: batch over data, heads over model). Tolerance: 1e-5 relative to the largest value.
    q, k, v, w = (
        jax.random.normal(key, (4, 128, 4, 16), jnp.float32) for key in jax.random.split(jax.random.key(0), 4)
    )
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    (_, expected), expected_grads = jax.jit(_loss_and_grads(xla))(q, k, v, w)
    mesh = make_mesh(mesh_spec, jax.devices()[: 4 if mesh_spec == "2x2" else 1])
    q, k, v, w = jax.device_put((q, k, v, w), NamedSharding(mesh, PartitionSpec(DATA, None, MODEL, None)))
    step = _loss_and_grads(lambda q, k, v: splash_attention(q, k, v, Runtime("cpu", mesh)))
    assert "pallas_call" in str(jax.make_jaxpr(step)(q, k, v, w))
    (_, got), grads = jax.jit(step)(q, k, v, w)
    for a, b in zip((got, *grads), (expected, *expected_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def test_without_the_steps_mesh_several_devices_take_xla_attention():
    # A Mosaic kernel cannot be split by XLA: without the step's mesh (evaluation) it would not compile.
    q = jnp.ones((8, 128, 4, 16), jnp.float32)
    attend = lambda q, k, v: splash_attention(q, k, v, Runtime("tpu"))
    assert jax.device_count() > 1 and "pallas_call" not in str(jax.make_jaxpr(attend)(q, q, q))


def test_auto_picks_splash_on_tpu_without_dropout():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, vocab_size=64)
    assert resolve_attention(config, "tpu") == "splash"
    assert resolve_attention(config.replace(dropout=0.1), "tpu") == "xla"
    with pytest.warns(UserWarning, match="no dropout"):
        assert resolve_attention(config.replace(attention="splash", dropout=0.1), "tpu") == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_attention(config, "cpu") == "xla"  # on the CPU auto stays with XLA, silently


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs requirements-plan-tpu.txt")
def test_v5e_plan_runs_splash_attention():
    tiny = ["--n_layer", "2", "--n_head", "4", "--n_embd", "256", "--block_size", "256", "--vocab_size", "512"]
    # AdamW: Muon's Newton-Schulz iterations cost more FLOPs per step than 2,048 tokens of this model
    step_flags = ["--batch_size", "8", "--dtype", "bfloat16", "--mesh", "2x2", "--optimizer", "adamw"]
    run_config = parse_run_config([*tiny, *step_flags])
    target = get_target("v5e:2x2")
    result = plan.make_plan(run_config, target, target_devices(target))
    assert result.device_kind == "TPU v5 lite" and result.num_devices == 4 and result.attention == "splash"
    # the forward kernel and the two backward ones (dq, dkv), each a Mosaic custom call, run once per layer
    assert result.custom_calls.get("tpu_custom_call", 0) >= 3 * 2 and result.custom_call_bytes_per_token > 0
    # XLA counts the kernel's FLOPs as zero; the roofline takes the model's, so MFU stays a fraction
    assert result.flops_per_token < result.model_flops_per_token and 0 < result.roofline_mfu <= 1
    assert result.fits
