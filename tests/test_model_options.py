"""The architecture options (rotary, RMSNorm, QK-norm, ReLU², untied head, no biases, zero init, soft-cap)
against a float64 NumPy GPT written here, and what they change around the model: sharding, FLOPs, export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.convert import save_hf_gpt2
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import make_mesh
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT, count_params, non_embedding_params
from jaxgpt.model.params import ParamCodec
from jaxgpt.train.metrics import flops_per_token

BASE = GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=16, pad_vocab_multiple=64)
MODERN = dict(
    position_embedding="rotary", norm="rmsnorm", norm_scale=False, qk_norm=True, activation="relu2",
    tie_embeddings=False, bias=False, logit_softcap=5.0,
)  # fmt: skip
CASES = {
    "gpt2": {},
    "rotary": dict(position_embedding="rotary", rope_base=100.0),
    "rmsnorm": dict(norm="rmsnorm"),
    "rmsnorm-no-scale": dict(norm="rmsnorm", norm_scale=False),
    "qk-norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "untied": dict(tie_embeddings=False),
    "no-bias": dict(bias=False),
    "softcap": dict(logit_softcap=2.0),
    "all": MODERN,
}


# --- A float64 NumPy GPT, written from the definitions rather than from jaxgpt.model. ---


def norm(x: np.ndarray, p: dict, prefix: str, kind: str, eps: float) -> np.ndarray:
    if kind == "rmsnorm":
        y = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    else:
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * p.get(f"{prefix}.scale", 1.0) + p.get(f"{prefix}.bias", 0.0)


def rotate(x: np.ndarray, base: float) -> np.ndarray:
    """RoPE as complex multiplication: pair (x_i, x_{i+D/2}) is the number x_i + i x_{i+D/2}, turned by t * theta_i."""
    t, d = x.shape[1], x.shape[-1] // 2
    theta = base ** (-np.arange(d) / d)
    turn = np.exp(1j * np.arange(t)[:, None] * theta)[None, :, None, :]  # [1, T, 1, D/2]
    z = (x[..., :d] + 1j * x[..., d:]) * turn
    return np.concatenate([z.real, z.imag], axis=-1)


def reference_logits(p: dict, c: GPTConfig, tokens: np.ndarray) -> np.ndarray:
    t = tokens.shape[1]
    x = p["wte.embedding"][tokens]
    if c.position_embedding == "learned":
        x = x + p["wpe.embedding"][:t]
    eps = c.layer_norm_eps
    for i in range(c.n_layer):
        h = norm(x, p, f"h.{i}.ln_1", c.norm, eps)
        qkv = np.einsum("btc,cshd->btshd", h, p[f"h.{i}.attn.c_attn.kernel"]) + p.get(f"h.{i}.attn.c_attn.bias", 0.0)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if c.qk_norm:
            q, k = norm(q, p, f"h.{i}.attn.q_norm", "rmsnorm", eps), norm(k, p, f"h.{i}.attn.k_norm", "rmsnorm", eps)
        if c.position_embedding == "rotary":
            q, k = rotate(q, c.rope_base), rotate(k, c.rope_base)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c.head_dim)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        y = np.einsum("bhqk,bkhd->bqhd", weights, v)
        x = x + np.einsum("bthd,hdc->btc", y, p[f"h.{i}.attn.c_proj.kernel"]) + p.get(f"h.{i}.attn.c_proj.bias", 0.0)
        h = norm(x, p, f"h.{i}.ln_2", c.norm, eps) @ p[f"h.{i}.mlp.c_fc.kernel"] + p.get(f"h.{i}.mlp.c_fc.bias", 0.0)
        if c.activation == "relu2":
            h = np.maximum(h, 0) ** 2
        else:
            h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + h @ p[f"h.{i}.mlp.c_proj.kernel"] + p.get(f"h.{i}.mlp.c_proj.bias", 0.0)
    x = norm(x, p, "ln_f", c.norm, eps)
    logits = x @ (p["wte.embedding"].T if c.tie_embeddings else p["lm_head.kernel"])
    if c.logit_softcap:
        logits = c.logit_softcap * np.tanh(logits / c.logit_softcap)
    return logits[..., : c.vocab_size]


@pytest.mark.parametrize("case", CASES)
def test_option_matches_float64_reference(case):
    config = BASE.replace(**CASES[case])
    codec = ParamCodec(config)
    rng = np.random.default_rng(0)  # random values everywhere (scales, biases, zero-init kernels too)
    params = {name: rng.normal(0, 0.3, leaf.shape) for name, leaf in codec.abstract.items()}
    tokens = rng.integers(0, config.vocab_size, (2, 12))
    ours = np.asarray(codec.to_model(codec.cast(params))(jnp.asarray(tokens)))
    expected = reference_logits(params, config, tokens)
    np.testing.assert_allclose(ours[..., : config.vocab_size], expected, atol=2e-4, rtol=2e-4)
    assert (ours[..., config.vocab_size :] < -1e30).all()  # padded entries stay masked with a soft-cap too


def test_modern_model_has_exactly_the_parameters_it_needs():
    names = set(ParamCodec(BASE.replace(**MODERN)).names)
    assert "wpe.embedding" not in names and "lm_head.kernel" in names
    assert not any(n.endswith(".bias") or n.endswith(".scale") for n in names)  # no biases, parameter-free norms
    scaled = ParamCodec(BASE.replace(qk_norm=True)).names
    assert "h.0.attn.q_norm.scale" in scaled and "h.0.attn.k_norm.scale" in scaled


def test_zero_init_projections_and_head():
    model = GPT(BASE.replace(zero_init_proj=True, tie_embeddings=False), nnx.Rngs(0))
    for block in model.h:
        assert not np.any(block.attn.c_proj.kernel.get_value()) and not np.any(block.mlp.c_proj.kernel.get_value())
        assert np.std(block.attn.c_attn.kernel.get_value()) > 0.01  # inputs keep GPT-2's init
    assert not np.any(model.lm_head.kernel.get_value())
    default = GPT(BASE, nnx.Rngs(0)).h[0].mlp.c_proj.kernel.get_value()
    assert np.std(default) == pytest.approx(0.02 / np.sqrt(2 * BASE.n_layer), rel=0.2)


def test_every_parameter_has_logical_axes_and_shards_on_a_4x2_mesh():
    config = BASE.replace(**{**MODERN, "norm_scale": True}, n_embd=32)
    abstract = nnx.eval_shape(lambda: GPT(config, nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.get_value().ndim, (path, axes)
    shardings = ParamCodec(config).shardings(make_mesh("4x2", jax.devices()[:8]), fsdp=True)
    assert tuple(shardings["lm_head.kernel"].spec) == ("data", "model")  # embed over data (FSDP), vocab over model
    assert tuple(shardings["h.0.attn.q_norm.scale"].spec) == (None,)


def test_flops_count_matmul_parameters_only():
    """6N + attention: no position table with rotary; the untied head is a matmul, the embedding lookup is not."""
    c = BASE.replace(position_embedding="rotary", tie_embeddings=False)
    model = nnx.eval_shape(lambda: GPT(c, nnx.Rngs(0)))
    blocks = c.n_layer * (12 * c.n_embd**2 + 13 * c.n_embd)  # qkv, proj, mlp weights and biases, two LayerNorms
    head, final_norm = c.vocab_size * c.n_embd, 2 * c.n_embd
    assert non_embedding_params(model) == blocks + head + final_norm
    assert count_params(model) == blocks + 2 * head + final_norm
    assert flops_per_token(c, non_embedding_params(model)) == 6 * (blocks + head + final_norm) + 12 * 2 * 16 * 16


def test_exporting_a_modern_model_to_hugging_face_is_a_clear_error(tmp_path):
    model = GPT(BASE.replace(position_embedding="rotary", activation="relu2"), nnx.Rngs(0))
    with pytest.raises(UserError, match=r"not GPT-2's architecture \(position_embedding=rotary, activation=relu2\)"):
        save_hf_gpt2(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    save_hf_gpt2(GPT(BASE.replace(zero_init_proj=True), nnx.Rngs(0)), tmp_path / "ok")  # an init is no architecture
