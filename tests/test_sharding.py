from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import make_mesh, parse_mesh, shard_model
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT

CONFIG = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=32, pad_vocab_multiple=64)


def test_mesh_spec_is_checked_against_devices():
    assert parse_mesh("4x2", 8) == (4, 2)
    for bad in ("3x2", "8", "axb", "0x8"):
        with pytest.raises(UserError, match="mesh"):
            parse_mesh(bad, 8)


@pytest.mark.parametrize("fsdp", [False, True])
def test_parameters_follow_the_tensor_parallel_rules(fsdp):
    model = shard_model(GPT(CONFIG, nnx.Rngs(0)), make_mesh("2x4"), fsdp=fsdp)
    d = "data" if fsdp else None
    block = model.h[0]
    specs = {
        "qkv (output: heads)": (block.attn.c_attn.kernel, P(d, None, "model", None)),
        "attn out (input: heads)": (block.attn.c_proj.kernel, P("model", None, d)),
        "mlp up (output)": (block.mlp.c_fc.kernel, P(d, "model")),
        "mlp down (input)": (block.mlp.c_proj.kernel, P("model", d)),
        "embedding (vocab)": (model.wte.embedding, P("model", d)),
        "layernorm": (block.ln_1.scale, P(d)),
    }
    for what, (variable, spec) in specs.items():
        assert variable[...].sharding.spec == spec, what


def test_sharded_forward_equals_single_device():
    tokens = jax.random.randint(jax.random.key(0), (8, 32), 0, 100)
    reference = GPT(CONFIG, nnx.Rngs(0))(tokens)
    for spec in ("8x1", "4x2", "1x8"):
        model = shard_model(GPT(CONFIG, nnx.Rngs(0)), make_mesh(spec), fsdp=True)
        out = jax.jit(lambda m, t: m(t))(model, tokens)
        np.testing.assert_allclose(out, reference, atol=1e-5)


def test_non_dividing_dimension_is_replicated_with_a_warning():
    config = CONFIG.replace(n_head=2, n_embd=32)  # 2 heads on a 4-way model axis
    with pytest.warns(UserWarning, match="replicating"):
        model = shard_model(GPT(config, nnx.Rngs(0)), make_mesh("2x4"))
    assert model.h[0].attn.c_attn.kernel[...].sharding.spec == P(None, None, None, None)
    assert jnp.isfinite(model(jnp.zeros((2, 8), jnp.int32))).all()
