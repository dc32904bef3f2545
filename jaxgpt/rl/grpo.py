"""GRPO (Shao et al., 2024) as TRL's ``GRPOTrainer`` computes it, with one update per generation.

Each step samples ``group_size`` completions of each of its prompts from the current policy (the
KV-cache sampler, ``jaxgpt.sampling.generate``), scores them with the reward function and turns the
rewards into group-normalised advantages ``A = (r - mean_group) / (std_group + 1e-4)`` (TRL's
``scale_rewards="group"``, the unbiased std as ``torch.std``). The loss is the clipped policy
gradient over every completion token, ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with
``rho = pi / pi_old``, plus ``kl_coef`` times the k3 estimate of KL(pi || pi_ref)
(``exp(ref - logp) - (ref - logp) - 1``), averaged over all completion tokens of the step (TRL's
default ``loss_type="dapo"``). With one update per generation (TRL's ``num_iterations=1``) pi_old
is pi itself, detached: rho is 1 and the gradient is the policy gradient ``-A grad log pi``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.chat import template as chat
from jaxgpt.core.platform import Runtime
from jaxgpt.model.gpt import GPT
from jaxgpt.model.losses import model_weighted_nll
from jaxgpt.rl.rewards import Reward, prompt_messages
from jaxgpt.sampling.generate import generate
from jaxgpt.tokenizer import Tokenizer
from jaxgpt.train.step import Batch

ADVANTAGE_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)


def group_advantages(rewards_PxG: np.ndarray) -> np.ndarray:
    """Group-normalised advantages of rewards [prompts, group_size] (unbiased std, as torch.std)."""
    assert rewards_PxG.ndim == 2 and rewards_PxG.shape[1] > 1, rewards_PxG.shape
    mean = rewards_PxG.mean(axis=1, keepdims=True)
    std = rewards_PxG.std(axis=1, ddof=1, keepdims=True)
    return (rewards_PxG - mean) / (std + ADVANTAGE_EPS)


def grpo_token_loss(
    logps: jax.Array, advantages: jax.Array, epsilon: float, kl_coef: float, ref_logps: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Per-token loss and KL [B, T] from log-probs [B, T] and per-token advantages [B, T]."""
    ratio = jnp.exp(logps - jax.lax.stop_gradient(logps))  # pi / pi_old with pi_old = pi (one update a batch)
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + epsilon)
    loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    if ref_logps is None:
        return loss, jnp.zeros_like(loss)
    delta = ref_logps - logps
    kl = jnp.exp(delta) - delta - 1
    return loss + kl_coef * kl, kl


@dataclasses.dataclass(frozen=True)
class GRPO:
    """The GRPO objective for ``jaxgpt.train.step.make_train_step``: rollouts with token advantages."""

    epsilon: float = 0.2
    kl_coef: float = 0.0

    def scale(self, batch: Batch) -> jax.Array:
        return 1.0 / jnp.maximum(batch["weights"].sum(), 1.0)  # the mean over every completion token of the step

    def loss(self, model: GPT, micro: Batch, key: jax.Array | None, reference: GPT | None, runtime: Runtime):
        weights = micro["weights"]
        logps = token_log_probs(model, micro, runtime)
        ref = None if reference is None else jax.lax.stop_gradient(token_log_probs(reference, micro, runtime))
        loss, kl = grpo_token_loss(logps, micro["advantages"], self.epsilon, self.kl_coef, ref)
        return (loss * weights).sum(), {"kl": (kl * weights).sum()}


def token_log_probs(model: GPT, micro: Batch, runtime: Runtime | None = None) -> jax.Array:
    """log p(target) at every position, float32 [B, T]."""
    ones = jnp.ones(micro["targets"].shape, jnp.float32)
    return -model_weighted_nll(model, micro["inputs"], micro["targets"], ones, None, runtime, axis=())


def prompt_tokens(records: Sequence[dict[str, Any]], tokenizer: Tokenizer) -> list[list[int]]:
    """Each record's conversation rendered up to ``Assistant:``: what the policy continues."""
    return [
        chat.render(prompt_messages(r, f"prompt {i}"), tokenizer, add_generation_prompt=True).tokens.tolist()
        for i, r in enumerate(records)
    ]


def completion_text(tokens: Sequence[int], tokenizer: Tokenizer) -> str:
    """A completion's text: up to (not including) the EOT that ends the assistant's turn."""
    tokens, eot = list(tokens), tokenizer.eot_id
    return tokenizer.decode(tokens[: tokens.index(eot)] if eot in tokens else tokens)


@dataclasses.dataclass
class Rollout:
    """One step's samples: prompt and completion tokens, rewards [P, G] and advantages [P, G]."""

    prompts: list[list[int]]  # P * G rows, group by group
    completions: list[list[int]]
    rewards: np.ndarray
    advantages: np.ndarray

    def batch(self, block_size: int, grad_accum: int = 1) -> dict[str, np.ndarray]:
        """Rows of prompt + completion, right-padded to ``block_size``: ``weights`` 1 on the completion's targets
        and ``advantages`` its row's advantage on every token, stacked [grad_accum, rows / grad_accum, T]."""
        rows = len(self.prompts)
        batch = {k: np.zeros((rows, block_size), np.int32) for k in ("inputs", "targets")}
        batch.update({k: np.zeros((rows, block_size), np.float32) for k in ("weights", "advantages")})
        for row, (prompt, completion) in enumerate(zip(self.prompts, self.completions, strict=True)):
            tokens = prompt + completion
            n = len(tokens) - 1
            assert n <= block_size, (n, block_size)
            batch["inputs"][row, :n], batch["targets"][row, :n] = tokens[:-1], tokens[1:]
            batch["weights"][row, len(prompt) - 1 : n] = 1.0
            batch["advantages"][row, :n] = self.advantages.reshape(-1)[row]
        return {k: v.reshape(grad_accum, rows // grad_accum, block_size) for k, v in batch.items()}

    def stats(self) -> dict[str, float]:
        lengths = [len(c) for c in self.completions]
        return {"reward": float(self.rewards.mean()), "completion_length": float(np.mean(lengths))}


def rollout(
    model: GPT,
    records: Sequence[dict[str, Any]],
    reward: Reward,
    tokenizer: Tokenizer,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    key: jax.Array,
    top_k: int | None = None,
    mesh=None,
) -> Rollout:
    """Samples ``group_size`` completions of every record and scores them."""
    prompts = [p for p in prompt_tokens(records, tokenizer) for _ in range(group_size)]
    completions = generate(
        model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, key=key, mesh=mesh,
        eot_id=tokenizer.eot_id,
    )  # fmt: skip
    texts = [completion_text(c, tokenizer) for c in completions]
    scores = [float(reward(records[i // group_size], text)) for i, text in enumerate(texts)]
    rewards = np.asarray(scores, np.float32).reshape(len(records), group_size)
    return Rollout(prompts, completions, rewards, group_advantages(rewards))


def pass_at_1(
    model: GPT,
    records: Sequence[dict[str, Any]],
    reward: Reward,
    tokenizer: Tokenizer,
    max_new_tokens: int,
    batch_size: int,
    mesh=None,
) -> float:
    """Share of records whose greedy completion earns reward 1 (held-out pass@1)."""
    passed = 0
    for first in range(0, len(records), batch_size):
        chunk = records[first : first + batch_size]
        prompts = prompt_tokens(chunk, tokenizer)
        completions = generate(model, prompts, max_new_tokens, temperature=0.0, mesh=mesh, eot_id=tokenizer.eot_id)
        texts = [completion_text(c, tokenizer) for c in completions]
        passed += sum(reward(r, text) >= 1.0 for r, text in zip(chunk, texts, strict=True))
    return passed / len(records)
