"""The optimizers: AdamW with GPT-2's recipe (linear warmup, cosine decay, decay only on matrices,
clipping), or Muon on the hidden matrices with AdamW on the rest (modded-nanogpt's recipe).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, muon

from jaxgpt.train.config import TrainConfig


def learning_rate_schedule(
    lr: float, min_lr: float, warmup_steps: int, decay_steps: int, warmdown_steps: int = 0
) -> optax.Schedule:
    """Linear warmup from lr/warmup to lr, then cosine decay to ``min_lr`` at ``decay_steps``; flat after.

    Step ``s`` (0-based) uses ``lr * (s + 1) / warmup`` during warmup, as nanoGPT and llm.c do, so the
    first update is not wasted with a zero learning rate. ``warmdown_steps > 0`` replaces the cosine
    by modded-nanogpt's trapezoid: ``lr`` until ``decay_steps - warmdown_steps``, then linear to ``min_lr``.
    """
    assert 0 <= min_lr <= lr, (min_lr, lr)
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(decay_steps), warmup_steps + 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1) / max(warmup_steps, 1)
        if warmdown_steps > 0:
            decay = min_lr + jnp.clip((decay_steps - step) / warmdown_steps, 0.0, 1.0) * (lr - min_lr)
        else:
            progress = jnp.clip((step - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
            decay = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (lr - min_lr)
        return jnp.where(step < warmup_steps, warm, decay)

    return schedule


def decay_mask(params):
    """Weight decay on matrices and embeddings (ndim >= 2), never on biases or LayerNorm parameters."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def muon_dimension_numbers(params: dict) -> dict[str, MuonDimensionNumbers | None]:
    """The matrix Muon sees in each hidden weight (None: the parameter goes to AdamW).

    Attention keeps heads on their own kernel axes, so the matrices are named by axes: ``c_attn``
    [C, 3, H, D] is three C x C projections (q, k, v: axis 1 is a batch axis, each orthogonalised on
    its own, as modded-nanogpt splits its qkv); ``c_proj`` [H, D, C] is one C x C matrix. Embeddings,
    an untied head, norms and biases are not hidden matrices.
    """

    def numbers(name: str) -> MuonDimensionNumbers | None:
        if not (name.startswith("h.") and name.endswith(".kernel")):
            return None
        if name.endswith("attn.c_attn.kernel"):
            return MuonDimensionNumbers(reduction_axis=0, output_axis=(2, 3))
        if name.endswith("attn.c_proj.kernel"):
            return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
        return MuonDimensionNumbers(reduction_axis=0, output_axis=1)  # the MLP's [in, out] kernels

    return {name: numbers(name) for name in params}


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    grad_clip: float = 1.0,
    muon_schedule: optax.Schedule | None = None,
    muon_momentum: float = 0.95,
) -> optax.GradientTransformation:
    """AdamW on every parameter; with ``muon_schedule``, Muon on the hidden matrices and AdamW on the rest.

    Muon (``optax.contrib.muon``, Nesterov momentum, 5 Newton-Schulz steps) scales each orthogonalised
    update to RMS 1 (``sqrt(max(fan_in, fan_out))``, as modded-nanogpt's 10/14/24 record), so its learning
    rate is the per-entry step size. ``weight_decay`` then decays the Muon matrices only; the AdamW group
    (embeddings, head, norms, biases: Nesterov-AdamW as optax's muon builds it) is not decayed.
    """
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    if muon_schedule is None:
        adamw = optax.adamw(schedule, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
        return optax.chain(clip, adamw)
    hybrid = muon(
        muon_schedule,
        beta=muon_momentum,
        weight_decay=weight_decay,
        adam_learning_rate=schedule,
        adam_b1=beta1,
        adam_b2=beta2,
        eps=eps,
        muon_weight_dimension_numbers=muon_dimension_numbers,
        consistent_rms=1.0,
    )
    return optax.chain(clip, hybrid)


def optimizer_from_config(cfg: TrainConfig) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The schedule and optimizer a training run uses (train.py and the compile plan share it).

    Each optimizer group has its own peak learning rate (``--lr``; ``--muon_lr`` with ``--optimizer muon``)
    and the same schedule shape, its floor scaled like its peak.
    """

    def schedule_at(peak: float) -> optax.Schedule:
        min_lr = cfg.min_lr if peak == cfg.lr else min(peak, cfg.min_lr * peak / cfg.lr)
        return learning_rate_schedule(peak, min_lr, cfg.warmup_steps, cfg.decay_steps, cfg.warmdown_steps)

    schedule = schedule_at(cfg.lr)
    tx = make_optimizer(
        schedule, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, grad_clip=cfg.grad_clip,
        muon_schedule=schedule_at(cfg.muon_lr) if cfg.optimizer == "muon" else None, muon_momentum=cfg.muon_momentum,
    )  # fmt: skip
    return schedule, tx
