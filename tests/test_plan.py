"""The compile plan: loop-aware costs, the train step it compiles, and (with the CUDA plugin) an H100 plan."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import make_mesh
from jaxgpt.plan import report as plan
from jaxgpt.plan.hardware import get_target, target_devices
from jaxgpt.plan.hlo_cost import program_cost
from jaxgpt.train.config import parse_run_config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

TINY = ["--preset", "shakespeare-gpt2", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32"]
TINY += ["--vocab_size", "256"]


def _optimised_module(fn, *args):
    return jax.jit(fn).lower(*args).compile().runtime_executable().hlo_modules()[0]


def _loop(x):
    return jax.lax.fori_loop(0, 5, lambda i, y: jnp.tanh(y @ x), x)


def test_loop_bodies_count_once_per_iteration():
    # XLA's own analysis prices a while body once; ours must see all 5 matmuls of 2*64^3 FLOPs.
    x = jnp.ones((64, 64), jnp.float32)
    cost = program_cost(_optimised_module(_loop, x))
    assert 5 * 2 * 64**3 <= cost.flops < 5.5 * 2 * 64**3
    assert cost.bytes_accessed >= 5 * 2 * x.nbytes and not cost.xla_remat and not cost.custom_calls


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs requirements-plan-tpu.txt")
def test_tpu_loops_count_once_per_iteration():
    # The TPU compiler's loops carry no trip count: it is read off the loop condition.
    mesh = make_mesh("1x1", target_devices(get_target("v5e:1x1")))
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    cost = program_cost(_optimised_module(_loop, x))
    assert 5 * 2 * 256**3 <= cost.flops < 5.5 * 2 * 256**3


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs requirements-plan-tpu.txt")
def test_tpu_plan_that_does_not_fit_says_so():
    # XLA:TPU refuses to compile a step whose temporaries exceed the chip's HBM: one clear error, no traceback.
    wide = ["--n_layer", "1", "--n_head", "4", "--n_embd", "256", "--block_size", "256", "--vocab_size", "512"]
    with pytest.raises(plan.DoesNotFit, match=r"micro-batch 8192 does not fit on v5e:1x1: .*HBM"):
        plan.main(["--target", "v5e:1x1", *wide, "--dtype", "bfloat16", "--batch_size", "8192"])


def test_tpu_targets_are_slices():
    assert get_target("v5e:4x4").num_devices == 16 and get_target("v4:2x2x1").memory_bytes == 32 * 2**30
    assert get_target("v5p:2x2x2", num_slices=2).num_devices == 16
    for name, slices, message in [
        ("v5e:2x2x1", 1, "written v5e:2x2"),
        ("v5p:2x2", 1, "written v5p:2x2x1"),
        ("h100", 2, "--num_slices is for TPU"),
        ("v7:2x2", 1, "unknown --target"),
    ]:
        with pytest.raises(UserError, match=message):
            get_target(name, slices)
    with pytest.raises(UserError, match="has 4 chips, not --num_devices 8"):
        target_devices(get_target("v5e:2x2"), 8)


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message when libtpu is missing")
def test_tpu_target_without_libtpu_says_what_to_install():
    with pytest.raises(UserError, match=r"requirements-plan-tpu\.txt"):
        plan.main(["--target", "v5e:2x2", *TINY])


def _cpu_plan(*flags):
    run_config = parse_run_config([*TINY, *flags])
    target = get_target("cpu")
    return plan.make_plan(run_config, target, target_devices(target, 2))


def test_cpu_plan_of_the_train_step():
    one, accumulated = _cpu_plan("--batch_size", "4"), _cpu_plan("--batch_size", "4", "--grad_accum", "3")
    assert one.fits and not one.xla_remat and one.num_devices == 2 and one.attention == "xla"
    assert one.tokens_per_step == 4 * 32 and accumulated.tokens_per_step == 3 * 4 * 32
    # XLA's FLOPs are the model's (6N + attention) plus the small rest (LayerNorm, softmax, AdamW)...
    assert one.model_flops_per_token <= one.flops_per_token < 1.3 * one.model_flops_per_token
    # ...and per token they do not depend on how many micro-batches the step's loop runs.
    assert accumulated.flops_per_token == pytest.approx(one.flops_per_token, rel=0.05)
    assert accumulated.argument_bytes > one.argument_bytes  # three micro-batches of tokens come in


def test_cli_prints_json(capsys):
    plan.main(["--target", "cpu", "--json", *TINY, "--batch_size", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["target"] == "cpu" and printed["fits"] and printed["bytes_per_token"] > 0


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None, reason="needs requirements-plan.txt")
def test_h100_plan_uses_cudnn_attention():
    run_config = parse_run_config([*TINY, "--batch_size", "8", "--dtype", "bfloat16", "--attention", "auto"])
    target = get_target("h100")
    result = plan.make_plan(run_config, target, target_devices(target, 1))
    assert result.device_kind == "NVIDIA H100 80GB HBM3" and result.attention == "cudnn"
    assert any("fmha" in name for name in result.custom_calls) and result.custom_call_bytes_per_token > 0
    assert result.fits and result.roofline_tokens_per_s > 0


@pytest.mark.parametrize("limit", [3, 12, 13, 100])
@pytest.mark.parametrize("start", [4, 16])
def test_largest_batch_search(limit, start):
    tried = []
    fits = lambda batch: tried.append(batch) or batch <= limit
    assert plan.largest_batch(fits, start, start <= limit, step=4) == ((limit // 4 * 4) or None)
    assert all(batch % 4 == 0 for batch in tried)
