"""--optimizer muon: which parameters Muon sees and as which matrices, its update against a NumPy
Newton-Schulz, the trapezoid schedule, state sharding, and an exact resume on a 4x2 FSDP mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.checkpoints.checkpointer import Checkpointer
from jaxgpt.core.sharding import make_mesh
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.params import ParamCodec
from jaxgpt.train.optim import learning_rate_schedule, make_optimizer, muon_dimension_numbers
from jaxgpt.train.step import train_state_shardings
from tests.test_resume import assert_same_run
from tests.train_utils import run_train_cli, train_args, write_token_data

CONFIG = GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8, tie_embeddings=False)


def newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """Keller Jordan's quintic iteration in float64 (the wide orientation, as modded-nanogpt)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (np.linalg.norm(g) + 1e-8)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x if wide else x.T


def test_muon_gets_the_hidden_matrices_and_adamw_the_rest():
    numbers = muon_dimension_numbers(ParamCodec(CONFIG).abstract)
    adamw = sorted(name for name, n in numbers.items() if n is None)
    assert adamw == sorted(
        ["wte.embedding", "wpe.embedding", "lm_head.kernel", "ln_f.scale", "ln_f.bias"]
        + [f"h.0.{p}" for p in ("ln_1.scale", "ln_1.bias", "ln_2.scale", "ln_2.bias")]
        + [f"h.0.{p}.bias" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    )


def test_update_orthogonalises_q_k_v_and_the_output_projection_as_their_matrices():
    """First step: -lr * sqrt(max(fan_in, fan_out)) * NS(gradient), q, k and v each a C x C matrix of their own."""
    c, h, d = CONFIG.n_embd, CONFIG.n_head, CONFIG.head_dim
    codec = ParamCodec(CONFIG)
    params = {name: jnp.zeros(leaf.shape) for name, leaf in codec.abstract.items()}
    rng = np.random.default_rng(0)
    grads = {name: jnp.asarray(rng.normal(size=leaf.shape), jnp.float32) for name, leaf in codec.abstract.items()}
    lr = 0.01
    tx = make_optimizer(lambda _: 1e-3, weight_decay=0.0, grad_clip=0.0, muon_schedule=lambda _: lr)
    updates, _ = tx.update(grads, tx.init(params), params)
    qkv = np.asarray(grads["h.0.attn.c_attn.kernel"], np.float64)  # [C, 3, H, D]
    for i in range(3):
        expected = -lr * np.sqrt(c) * newton_schulz(qkv[:, i].reshape(c, c))
        np.testing.assert_allclose(updates["h.0.attn.c_attn.kernel"][:, i].reshape(c, c), expected, atol=1e-4)
    proj = np.asarray(grads["h.0.attn.c_proj.kernel"], np.float64).reshape(h * d, c)  # [H, D, C] -> [C, C]
    expected = -lr * np.sqrt(c) * newton_schulz(proj)
    np.testing.assert_allclose(updates["h.0.attn.c_proj.kernel"].reshape(c, c), expected, atol=1e-4)
    fc = np.asarray(grads["h.0.mlp.c_fc.kernel"], np.float64)
    np.testing.assert_allclose(updates["h.0.mlp.c_fc.kernel"], -lr * np.sqrt(4 * c) * newton_schulz(fc), atol=1e-4)
    # The head is AdamW's (Nesterov, as optax's muon builds it): first step -lr * (1 + b1 / (1 + b1)) * sign(g).
    head, sign = np.asarray(updates["lm_head.kernel"]), np.sign(np.asarray(grads["lm_head.kernel"]))
    np.testing.assert_allclose(head, -1e-3 * (1 + 0.9 / 1.9) * sign, rtol=1e-4)


def test_trapezoid_schedule():
    schedule = learning_rate_schedule(1.0, 0.1, warmup_steps=2, decay_steps=10, warmdown_steps=4)
    values = [float(schedule(s)) for s in range(12)]
    np.testing.assert_allclose(values, [0.5, 1, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325, 0.1, 0.1], atol=1e-6)


def test_optimizer_state_is_sharded_like_the_parameters_on_a_4x2_fsdp_mesh():
    config = CONFIG.replace(n_embd=32, n_head=2, position_embedding="rotary")
    codec = ParamCodec(config)
    tx = make_optimizer(lambda _: 1e-3, muon_schedule=lambda _: 1e-3)
    mesh = make_mesh("4x2", jax.devices()[:8])
    shardings = train_state_shardings(codec, tx, mesh, fsdp=True)
    moments = 0
    for path, sharding in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]:
        name = getattr(path[-1], "key", None)
        if name in codec.abstract:
            assert sharding == shardings.params[name], jax.tree_util.keystr(path)
            moments += 1
        else:
            assert sharding.spec == jax.sharding.PartitionSpec()  # counts, Newton-Schulz coefficients
    assert moments == 2 * len(codec.names) - len([n for n, x in muon_dimension_numbers(codec.abstract).items() if x])
    assert tuple(shardings.params["h.0.mlp.c_fc.kernel"].spec) == ("data", "model")


MODERN_MUON = [
    "--position_embedding", "rotary", "--norm", "rmsnorm", "--qk_norm", "true", "--activation", "relu2",
    "--tie_embeddings", "false", "--bias", "false", "--zero_init_proj", "true", "--logit_softcap", "15",
    "--optimizer", "muon", "--muon_lr", "3e-3", "--mesh", "4x2", "--fsdp", "true", "--lr_decay_steps", "6",
]  # fmt: skip


@pytest.mark.parametrize("first_steps", [3])
def test_muon_run_resumed_on_a_4x2_fsdp_mesh_equals_a_straight_run(tmp_path, first_steps):
    data = write_token_data(tmp_path / "data")
    straight = run_train_cli(train_args(data, tmp_path / "straight", *MODERN_MUON), devices=8)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "out"
    first = run_train_cli(train_args(data, out, *MODERN_MUON, "--max_steps", str(first_steps)), devices=8)
    assert first.returncode == 0, first.stderr[-3000:]
    assert Checkpointer(out, async_save=False).latest_step() == first_steps
    second = run_train_cli(train_args(data, out, *MODERN_MUON, "--resume"), devices=8)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from step {first_steps}" in second.stdout
    assert_same_run(out, tmp_path / "straight")
