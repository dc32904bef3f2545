"""Converter parity against transformers' PyTorch GPT2LMHeadModel (the reference implementation)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxgpt.convert import load_hf_gpt2, save_hf_gpt2
from jaxgpt.core.errors import UserError
from jaxgpt.model.losses import cross_entropy
from tests.hf_fixtures import hf_logits, make_hf_gpt2

SHAPES = [  # (n_layer, n_head, n_embd, n_positions, vocab_size)
    (2, 2, 32, 64, 50257),
    (3, 4, 64, 128, 50257),
    (1, 3, 48, 96, 1000),
    (4, 1, 16, 32, 97),
]


@pytest.mark.parametrize("pad", [1, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}H{}C{}T{}V{}".format(*s))
def test_float32_logits_and_loss_match_transformers(tmp_path, shape, pad):
    n_layer, n_head, n_embd, n_positions, vocab = shape
    ref = make_hf_gpt2(
        tmp_path, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=vocab
    )
    model = load_hf_gpt2(tmp_path, pad_vocab_multiple=pad)
    assert model.config.dtype == "float32" and model.config.dropout == 0.0
    tokens = np.random.default_rng(1).integers(0, vocab, (2, n_positions))  # the full context: position bugs show
    expected = hf_logits(ref, tokens)
    logits = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    assert logits.shape[-1] == model.config.padded_vocab_size
    diff = np.abs(logits[..., :vocab] - expected).max()
    print(f"shape {shape} pad {pad}: max |logits - transformers| = {diff:.3g}")
    assert diff < 1e-4
    with torch.no_grad():
        ids = torch.as_tensor(tokens)
        ref_loss = ref(ids, labels=ids).loss.item()  # transformers shifts labels inside
    loss = float(cross_entropy(jnp.asarray(logits[:, :-1]), jnp.asarray(tokens[:, 1:], jnp.int32)))
    assert abs(loss - ref_loss) < 1e-5


def test_bfloat16_compute_is_close(tmp_path):
    """bf16 has an 8-bit mantissa (relative error ~4e-3 per op); through a few layers logits stay within
    a few hundredths of float32, and the argmax agrees almost everywhere."""
    ref = make_hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=64, n_positions=64)
    tokens = np.random.default_rng(2).integers(0, 50257, (2, 64))
    expected = hf_logits(ref, tokens)
    logits = np.asarray(load_hf_gpt2(tmp_path, dtype="bfloat16")(jnp.asarray(tokens, jnp.int32)))[..., :50257]
    scale = np.abs(expected).max()
    assert np.abs(logits - expected).max() < 0.05 * scale
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() > 0.9


def test_save_round_trip_reloads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    ref = make_hf_gpt2(tmp_path / "src", n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=500)
    model = load_hf_gpt2(tmp_path / "src", pad_vocab_multiple=64)
    save_hf_gpt2(model, tmp_path / "out")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(3).integers(0, 500, (2, 64))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(ref, tokens))


def test_greedy_tokens_match_transformers_generate(tmp_path):
    ref = make_hf_gpt2(tmp_path, n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257)
    model = load_hf_gpt2(tmp_path)
    prompt = [464, 2068, 7586, 21831]
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = out[0, len(prompt) :].tolist()
    # The plain forward pass, no cache (the sampling tests check the cached path), compiled once: the
    # sequence is padded to its final length, and causal attention keeps padding out of earlier logits.
    forward = nnx.jit(lambda m, t: m(t))
    tokens = np.zeros((1, len(prompt) + 20), np.int32)
    tokens[0, : len(prompt)] = prompt
    for n in range(len(prompt), tokens.shape[1]):
        tokens[0, n] = int(np.asarray(forward(model, jnp.asarray(tokens)))[0, n - 1].argmax())
    tokens = tokens[0].tolist()
    assert tokens[len(prompt) :] == expected


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    make_hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)
    tensors = load_file(tmp_path / "model.safetensors")

    def broken(change):
        t = dict(tensors)
        change(t)
        save_file(t, tmp_path / "model.safetensors")
        with pytest.raises(UserError) as err:
            load_hf_gpt2(tmp_path)
        return str(err.value)

    assert "h.1.mlp.c_fc.bias" in broken(lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    save_file(tensors, tmp_path / "model.safetensors")
    assert "h.2.ln_1.weight" in broken(lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(32, np.float32)}))
    save_file(tensors, tmp_path / "model.safetensors")
    message = broken(lambda t: t.update({"transformer.wpe.weight": np.ones((65, 32), np.float32)}))
    assert "wpe.weight" in message and "(65, 32)" in message


def test_old_checkpoints_with_mask_buffers_and_bin_files_load(tmp_path):
    ref = make_hf_gpt2(tmp_path, n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=100)
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)  # OpenAI's original files hold these
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    tokens = np.arange(32)[None] % 100
    got = np.asarray(load_hf_gpt2(tmp_path)(jnp.asarray(tokens, jnp.int32)))[..., :100]
    assert np.abs(got - hf_logits(ref, tokens)).max() < 1e-4


def test_offline_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="local directory"):
        load_hf_gpt2("gpt2-not-cached-here")


def test_config_json_is_gpt2(tmp_path):
    make_hf_gpt2(tmp_path / "src", n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=100)
    save_hf_gpt2(load_hf_gpt2(tmp_path / "src", pad_vocab_multiple=64), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 100 and config["n_positions"] == 32 and config["model_type"] == "gpt2"
