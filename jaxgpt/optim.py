"""AdamW with GPT-2's recipe: linear warmup, cosine decay, decay only on matrices, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxgpt.train_config import TrainConfig


def learning_rate_schedule(lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> optax.Schedule:
    """Linear warmup from lr/warmup to lr, then cosine decay to ``min_lr`` at ``decay_steps``; flat after.

    Step ``s`` (0-based) uses ``lr * (s + 1) / warmup`` during warmup, as nanoGPT and llm.c do, so the
    first update is not wasted with a zero learning rate.
    """
    assert 0 <= min_lr <= lr, (min_lr, lr)
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(decay_steps), warmup_steps + 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1) / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (lr - min_lr)
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params):
    """Weight decay on matrices and embeddings (ndim >= 2), never on biases or LayerNorm parameters."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    adamw = optax.adamw(schedule, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw)


def optimizer_from_config(cfg: TrainConfig) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The schedule and optimizer a training run uses (train.py and the compile plan share it)."""
    schedule = learning_rate_schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps)
    tx = make_optimizer(
        schedule, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, grad_clip=cfg.grad_clip
    )
    return schedule, tx
