"""GRPO: rewards, advantages and the loss against hand-computed references, and tiny runs that learn a reward."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jaxgpt.checkpoints.state import init_train_state
from jaxgpt.convert import load_hf_gpt2
from jaxgpt.core.errors import UserError
from jaxgpt.model.params import ParamCodec
from jaxgpt.rl import rewards
from jaxgpt.rl.__main__ import GRPOConfig, prompt_sets, run_grpo
from jaxgpt.rl.grpo import GRPO, Rollout, group_advantages, prompt_tokens, token_log_probs
from jaxgpt.sampling.generate import generate
from jaxgpt.tokenizer import load_tokenizer
from jaxgpt.train.optim import learning_rate_schedule, make_optimizer
from jaxgpt.train.step import make_train_step
from tests.hf_fixtures import make_hf_gpt2

GSM8K_ROWS = [  # rows as openai/gsm8k stores them
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A box holds 1,200 pens; 200 are sold. How many are left?", "answer": "1200-200=1000\n#### 1,000"},
]


def vowel_share(record: dict, completion: str) -> float:
    """A dense reward a tiny random model can learn among its top-10 tokens: the share of vowels in the text."""
    return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


def test_exact_match_reads_gsm8k_answers(tmp_path: Path) -> None:
    assert rewards.final_number("so 12 + 3 = 15\n#### 15") == "15"
    assert rewards.exact_match(GSM8K_ROWS[1], "200 sold leaves 1000. #### 1000") == 1.0
    assert rewards.exact_match(GSM8K_ROWS[0], "I think 7 or maybe 8") == 0.0  # the last number counts without ####
    assert rewards.exact_match({"answer": 7}, "It is 7.") == 1.0
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    assert rewards.read_prompts(str(path)) == GSM8K_ROWS
    import pandas as pd  # GSM8K's hub files are parquet: one per split

    for split, rows in (("train", GSM8K_ROWS * 2), ("test", GSM8K_ROWS)):
        pd.DataFrame(rows).to_parquet(tmp_path / f"{split}-00000-of-00001.parquet")
    files = dict(data_files=str(tmp_path / "train-00000-of-00001.parquet"))
    files["eval_data_files"] = str(tmp_path / "test-00000-of-00001.parquet")
    train, held_out = prompt_sets(GRPOConfig(dataset="gsm8k", prompts_per_step=2, **files))
    assert len(train) == 4 and held_out == GSM8K_ROWS
    assert rewards.load_reward("tests.test_grpo:vowel_share")({}, "ab") == 0.5
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected a JSON object with 'answer'"):
        rewards.read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="--reward must be exact_match or module:function"):
        rewards.load_reward("nonsense")


def test_advantages_and_loss_match_a_hand_computed_reference(tmp_path: Path) -> None:
    rewards_PxG = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]], np.float32)
    advantages = group_advantages(rewards_PxG)
    for row, expected in zip(rewards_PxG, advantages, strict=True):  # (r - mean) / (sample std + 1e-4)
        std = np.sqrt(((row - row.mean()) ** 2).sum() / (len(row) - 1))
        np.testing.assert_allclose(expected, (row - row.mean()) / (std + 1e-4), rtol=1e-6)
    assert not advantages[1].any()  # a group that agrees teaches nothing

    make_hf_gpt2(tmp_path / "hf", n_positions=32)
    model = load_hf_gpt2(tmp_path / "hf")
    records = [{"prompt": p, "answer": 0} for p in ("Hi", "Say a word", "Count")]
    prompts = [p for p in prompt_tokens(records, load_tokenizer()) for _ in range(4)]
    completions = generate(model, prompts, 6, temperature=1.0, key=jax.random.key(1))
    samples = Rollout(prompts, completions, rewards_PxG, advantages)
    batch = samples.batch(32)
    codec = ParamCodec(model.config)
    logits = np.asarray(model(batch["inputs"][0]), np.float64)  # a float64 reference of the policy gradient
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    token_logps = np.take_along_axis(log_probs, batch["targets"][0][..., None], -1)[..., 0]
    weights = batch["weights"][0]
    for row, completion in enumerate(completions):
        assert weights[row].sum() == len(completion)  # every completion token is scored, nothing else
        assert batch["targets"][0][row][weights[row] == 1].tolist() == completion
    row_advantage = advantages.reshape(-1)[:, None]
    expected_loss = -(row_advantage * np.exp(0.0) * weights).sum() / weights.sum()  # ratio 1 at the first update

    schedule = learning_rate_schedule(1e-3, 1e-3, 0, 10)
    tx = make_optimizer(schedule)
    state = init_train_state(codec.to_flat(model), tx, seed=0)
    params = codec.to_flat(model)
    _, metrics = jax.jit(make_train_step(codec, tx, schedule, objective=GRPO(kl_coef=0.1)))(state, batch, params)
    assert float(metrics["loss"]) == pytest.approx(expected_loss, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-7)  # the reference is the policy
    # the gradient is that of the plain policy gradient -sum(A * log p) / completion tokens
    surrogate = lambda p: -(row_advantage * token_logps_of(codec, p, batch) * weights).sum() / weights.sum()
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(jax.grad(surrogate)(params))), rel=1e-5)
    np.testing.assert_allclose(np.asarray(token_logps_of(codec, params, batch)), token_logps, atol=1e-4)


def token_logps_of(codec: ParamCodec, params: dict, batch: dict):
    return token_log_probs(codec.to_model(params), {k: v[0] for k, v in batch.items()})


def test_a_tiny_run_learns_its_reward_and_resumes(tmp_path: Path) -> None:
    make_hf_gpt2(tmp_path / "hf", n_positions=32)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {i}", "answer": 0}) + "\n" for i in range(8)))
    args = dict(
        init_from=str(tmp_path / "hf"),
        prompts=str(prompts),
        eval_prompts=str(prompts),
        reward="tests.test_grpo:vowel_share",
    )
    args.update(
        group_size=8,
        prompts_per_step=4,
        max_new_tokens=8,
        lr=3e-2,
        min_lr=3e-2,
        kl_coef=0.05,
        top_k=10,
        eval_interval=0,
    )
    run_grpo(GRPOConfig(**args, out_dir=str(tmp_path / "run"), max_steps=16, save_interval=8))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards_by_step = [r["reward"] for r in records if "reward" in r]
    assert np.mean(rewards_by_step[-4:]) > np.mean(rewards_by_step[:4]) + 0.08, rewards_by_step
    assert records[0]["step"] == 0 and "pass@1" in records[0] and records[-1]["kl"] > 0
    # stopped at step 8 and resumed (a flat learning rate, as the first part is its own 8-step run): the same
    # prompts, samples and updates as the run that never stopped
    run_grpo(GRPOConfig(**args, out_dir=str(tmp_path / "resumed"), max_steps=8, save_interval=8))
    resumed = run_grpo(GRPOConfig(**args, out_dir=str(tmp_path / "resumed"), max_steps=16, save_interval=8))
    for name in ("loss", "reward", "kl", "grad_norm", "completion_length"):
        assert resumed[name] == pytest.approx(records[-1][name], rel=1e-4, abs=1e-6), name
