"""Checkpoints: retention (last N + best), verified restores, model export and import."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.checkpoints.checkpointer import Checkpointer
from jaxgpt.checkpoints.loading import load_model, load_model_from_checkpoint, save_model
from jaxgpt.checkpoints.state import init_train_state
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import make_mesh
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.model.params import ParamCodec
from jaxgpt.train.optim import learning_rate_schedule, make_optimizer
from jaxgpt.train.step import train_state_shardings

TINY = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=32)


def make_state(config=TINY, step=0):
    codec = ParamCodec(config)
    tx = make_optimizer(learning_rate_schedule(1e-3, 1e-4, 0, 10))
    state = init_train_state(codec.init(0), tx, seed=0)
    return state._replace(step=jnp.asarray(step, jnp.int32)), codec, tx


def test_keeps_the_last_n_and_the_best(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    state, _, _ = make_state()
    val_losses = {1: 5.0, 2: 3.0, 3: 4.0, 4: None, 5: 4.5, 6: None}
    for step, val in val_losses.items():
        checkpointer.save(state._replace(step=jnp.asarray(step)), data_state={"x": step}, meta={}, val_loss=val)
    checkpointer.close()
    assert Checkpointer(tmp_path).all_steps() == [2, 5, 6]  # best (val 3.0) + last two


def test_restore_round_trip_with_shardings(tmp_path):
    mesh = make_mesh("4x2")
    state, codec, tx = make_state(step=7)
    shardings = train_state_shardings(codec, tx, mesh, fsdp=True)
    state = jax.device_put(state, shardings)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(state, data_state={"grain": {"next_index": 7}}, meta={"note": "x"})
    checkpointer.wait()
    restored, data_state = checkpointer.restore(7, state, shardings)
    checkpointer.close()
    assert data_state == {"grain": {"next_index": 7}} and int(restored.step) == 7
    for name, value in state.params.items():
        np.testing.assert_array_equal(restored.params[name], value)
        assert restored.params[name].sharding == shardings.params[name]
    for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_differently_shaped_model_is_refused_by_name(tmp_path):
    state, _, _ = make_state()
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(state, data_state={}, meta={})
    checkpointer.wait()
    bigger, codec, tx = make_state(TINY.replace(n_embd=64))
    with pytest.raises(UserError, match=r"c_attn.bias is \(3, 4, 8\) in the checkpoint but \(3, 4, 16\)"):
        checkpointer.restore(0, bigger, train_state_shardings(codec, tx, make_mesh("8x1"), False))
    deeper, codec, tx = make_state(TINY.replace(n_layer=3))
    with pytest.raises(UserError, match=r"h\.2\.attn\.c_attn\.bias is missing in the checkpoint"):
        checkpointer.restore(0, deeper, train_state_shardings(codec, tx, make_mesh("8x1"), False))
    checkpointer.close()


def test_exported_model_loads_back_identically(tmp_path):
    model = GPT(TINY.replace(pad_vocab_multiple=64), nnx.Rngs(3))
    save_model(model, tmp_path / "export")
    loaded = load_model(tmp_path / "export")  # recognised as a jaxgpt checkpoint, not a HF directory
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    np.testing.assert_array_equal(loaded(tokens), model(tokens))
    bf16 = load_model_from_checkpoint(tmp_path / "export", dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16" and bf16.wte.embedding[...].dtype == jnp.float32


def test_convert_cli_between_formats(tmp_path):
    from transformers import GPT2LMHeadModel

    from jaxgpt.convert.__main__ import main as convert
    from tests.hf_fixtures import hf_logits, make_hf_gpt2

    reference = make_hf_gpt2(tmp_path / "hf", n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=300)
    convert(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ckpt"), "--format", "jaxgpt"])
    convert(["--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "hf2"), "--format", "hf"])
    tokens = np.random.default_rng(0).integers(0, 300, (1, 32))
    round_trip = GPT2LMHeadModel.from_pretrained(tmp_path / "hf2").eval()
    np.testing.assert_array_equal(hf_logits(round_trip, tokens), hf_logits(reference, tokens))
