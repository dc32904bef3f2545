from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.train.optim import decay_mask, learning_rate_schedule, make_optimizer


def test_warmup_then_cosine_to_min_lr():
    schedule = learning_rate_schedule(6e-4, 6e-5, warmup_steps=10, decay_steps=110)
    assert float(schedule(0)) == pytest.approx(6e-5)  # (0 + 1) / 10 of the peak: no wasted first step
    assert float(schedule(9)) == pytest.approx(6e-4)
    assert float(schedule(10)) == pytest.approx(6e-4)
    assert float(schedule(60)) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-5)  # half-way down the cosine
    assert float(schedule(110)) == pytest.approx(6e-5) and float(schedule(500)) == pytest.approx(6e-5)
    values = np.array([float(schedule(s)) for s in range(10, 111)])
    assert (np.diff(values) <= 1e-12).all()


def test_weight_decay_only_on_matrices_and_embeddings():
    params = {"wte.embedding": jnp.ones((8, 4)), "h.0.ln_1.scale": jnp.ones(4), "h.0.mlp.c_fc.bias": jnp.ones(16)}
    params["h.0.attn.c_attn.kernel"] = jnp.ones((4, 3, 2, 2))
    assert decay_mask(params) == {
        "wte.embedding": True, "h.0.ln_1.scale": False, "h.0.mlp.c_fc.bias": False, "h.0.attn.c_attn.kernel": True,
    }  # fmt: skip
    tx = make_optimizer(lambda _: 0.1, weight_decay=0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(updates["h.0.ln_1.scale"].max()) == 0.0
    np.testing.assert_allclose(updates["wte.embedding"], -0.1 * 0.5 * params["wte.embedding"])


def test_matches_torch_adamw_with_clipping():
    import torch

    rng = np.random.default_rng(0)
    weight, grads = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3, 5, 3)).astype(np.float32) * 3
    tx = make_optimizer(lambda _: 1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)
    params = {"w": jnp.asarray(weight)}
    state = tx.init(params)
    w_torch = torch.tensor(weight, requires_grad=True)
    opt = torch.optim.AdamW([w_torch], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = {"w": params["w"] + updates["w"]}
        w_torch.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([w_torch], 1.0)
        opt.step()
    np.testing.assert_allclose(params["w"], w_torch.detach().numpy(), atol=1e-6)
