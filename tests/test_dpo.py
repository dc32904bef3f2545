"""DPO: preference data in TRL's formats, the loss and gradient against TRL's DPOTrainer, and training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.chat.template import render
from jaxgpt.checkpoints.state import init_train_state
from jaxgpt.convert import load_hf_gpt2
from jaxgpt.core.errors import UserError
from jaxgpt.data.pipeline import Pairs, open_examples
from jaxgpt.data.prepare import PrepareConfig, prepare
from jaxgpt.model.params import ParamCodec
from jaxgpt.rl import DPO
from jaxgpt.tokenizer import load_tokenizer
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import next_batch
from jaxgpt.train.optim import learning_rate_schedule, make_optimizer
from jaxgpt.train.setup import setup
from jaxgpt.train.step import make_train_step
from tests.hf_fixtures import make_hf_gpt2
from tests.train_utils import logged_losses, run_train_cli

BLOCK = 64
SYSTEM_PAIR = {"system": "Be brief.", "prompt": "Capital of Zorbia?", "chosen": "Quellburg.", "rejected": "Zorb."}
HISTORY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
MESSAGE_PAIR = {
    "prompt": [*HISTORY, {"role": "user", "content": "Colour?"}],
    "chosen": [{"role": "assistant", "content": "Teal, friend."}],
    "rejected": [{"role": "assistant", "content": "No."}],
}  # fmt: skip
IMPLICIT_PAIR = {  # no "prompt": the shared first messages are the prompt (TRL's extract_prompt)
    "chosen": [{"role": "user", "content": "Tower?"}, {"role": "assistant", "content": "The Vey spire."}],
    "rejected": [{"role": "user", "content": "Tower?"}, {"role": "assistant", "content": "A tall one, I think."}],
}
PAIRS = [SYSTEM_PAIR, MESSAGE_PAIR, IMPLICIT_PAIR, {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five."}]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def prepare_pairs(folder: Path, lines: list, **kwargs) -> dict:
    config = dict(input=str(write_lines(folder / "pairs.jsonl", lines)), format="preference", num_proc=1)
    return prepare(PrepareConfig(**config, out_dir=str(folder / "data"), block_size=BLOCK, **kwargs))


def messages(pair: dict) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) messages as TRL reads the pair (extract_prompt for an implicit prompt)."""
    from trl.data_utils import extract_prompt

    if "prompt" not in pair:
        pair = extract_prompt(pair)
    if isinstance(pair["prompt"], str):
        prompt = [{"role": "system", "content": pair["system"]}] if "system" in pair else []
        prompt.append({"role": "user", "content": pair["prompt"]})
        return (
            prompt,
            [{"role": "assistant", "content": pair["chosen"]}],
            [{"role": "assistant", "content": pair["rejected"]}],
        )
    return pair["prompt"], pair["chosen"], pair["rejected"]  # fmt: skip


def trl_ids(pair: dict) -> dict[str, list[int]]:
    """prompt/chosen/rejected ids as TRL's DPOTrainer tokenizes a conversational pair (the completion starts
    where the tokenized prompt and prompt + completion diverge), with jaxgpt's template as the chat template."""
    prompt, chosen, rejected = messages(pair)
    tokenizer = load_tokenizer()
    prompt_ids = render(prompt, tokenizer, add_generation_prompt=True).tokens.tolist()
    full = {
        name: render(prompt + reply, tokenizer).tokens.tolist()
        for name, reply in (("chosen", chosen), ("rejected", rejected))
    }
    shared = min(
        next(i for i, (a, b) in enumerate(zip([*prompt_ids, -1], ids, strict=False)) if a != b) for ids in full.values()
    )
    return {"prompt_ids": prompt_ids[:shared], **{f"{k}_ids": ids[shared:] for k, ids in full.items()}}


def test_pairs_are_rendered_and_masked_as_trl_tokenizes_them(tmp_path: Path) -> None:
    meta = prepare_pairs(tmp_path, PAIRS, val_fraction=0.0)
    assert meta["format"] == "preference" and meta["splits"]["train"]["conversations"] == len(PAIRS)
    pairs = open_examples(tmp_path / "data", "train", BLOCK)
    assert isinstance(pairs, Pairs) and len(pairs) == len(PAIRS)
    batch = pairs.batch(np.arange(len(PAIRS)))
    for row, pair in enumerate(PAIRS):
        ids = trl_ids(pair)
        for half in ("chosen", "rejected"):
            sequence = ids["prompt_ids"] + ids[f"{half}_ids"]
            n = len(sequence)
            np.testing.assert_array_equal(batch[f"{half}_inputs"][row, : n - 1], sequence[:-1])
            np.testing.assert_array_equal(batch[f"{half}_targets"][row, : n - 1], sequence[1:])
            expected = np.arange(1, n) >= len(ids["prompt_ids"])  # TRL's completion_mask, shifted to the targets
            np.testing.assert_array_equal(batch[f"{half}_weights"][row, : n - 1], expected)
            assert not batch[f"{half}_weights"][row, n - 1 :].any()


def test_bad_lines_are_named_or_skipped(tmp_path: Path) -> None:
    bad = [
        "not json",
        {"prompt": "Hi", "chosen": "Hello."},
        {"prompt": HISTORY[:1], "chosen": [{"role": "user", "content": "x"}], "rejected": HISTORY[1:]},
        {"prompt": "Hi", "chosen": "", "rejected": "No."},
        {"prompt": "Hi " * 80, "chosen": "Yes.", "rejected": "No."},
    ]  # fmt: skip
    reasons = [
        "not JSON",
        "'chosen' and 'rejected'",
        "'chosen' must be one assistant message",
        "empty content",
        "longer than",
    ]
    for line, reason in zip(bad, reasons, strict=True):
        with pytest.raises(UserError, match=rf"pairs.jsonl:2: .*{reason}.*--skip_bad"):
            prepare_pairs(tmp_path, [PAIRS[0], line, PAIRS[1]])
    meta = prepare_pairs(tmp_path, [*PAIRS, *bad], skip_bad=True, val_fraction=0.0)
    assert meta["skipped_bad_lines"] == len(bad) and meta["splits"]["train"]["conversations"] == len(PAIRS)
    with pytest.raises(UserError, match="--format preference reads --input"):
        PrepareConfig(dataset="alpaca", format="preference")


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A policy and a reference: two tiny random GPT-2s saved by transformers."""
    folder = tmp_path_factory.mktemp("hf")
    make_hf_gpt2(folder / "policy", seed=1, n_positions=BLOCK)
    make_hf_gpt2(folder / "reference", seed=0, n_positions=BLOCK)
    return folder / "policy", folder / "reference"


def trl_loss_and_grad_norm(
    policy_dir: Path,
    reference_dir: Path,
    examples: list[dict],
    beta: float,
    sft_weight: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple:
    """TRL's DPOTrainer's loss, gradient norm and logged rewards on one collated batch of ``examples``
    (with ``sft_weight``: its loss types ``loss_type`` and sft, weighted 1 and ``sft_weight``)."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    eot = "<|endoftext|>"  # the trainer needs a tokenizer for its pad token; the batch is tokenized above
    vocab = Tokenizer(models.WordLevel({eot: 50256, "x": 0}, unk_token="x"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token=eot, pad_token=eot)
    types = [loss_type, "sft"] if sft_weight else [loss_type]
    losses = dict(loss_type=types, loss_weights=[1.0, sft_weight]) if sft_weight else dict(loss_type=types)
    args = DPOConfig(str(policy_dir.parent / "trl"), beta=beta, report_to=[], use_cpu=True, bf16=False, **losses)
    policy, reference = (GPT2LMHeadModel.from_pretrained(d) for d in (policy_dir, reference_dir))
    dummy = Dataset.from_list([{"prompt": "x", "chosen": "x", "rejected": "x x"}])
    trainer = DPOTrainer(policy, reference, args=args, train_dataset=dummy, processing_class=tokenizer)
    trainer.model.train()  # as in training (the trainer has switched dropout off)
    loss = trainer.compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=50256)(examples))
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainer.model.parameters() if p.grad is not None))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return loss.item(), norm.item(), logged


@pytest.mark.parametrize(("loss_type", "sft_weight"), [("sigmoid", 0.0), ("sigmoid", 0.7), ("ipo", 0.0)])
def test_loss_gradient_and_rewards_equal_trl(
    hf_pair: tuple[Path, Path], tmp_path: Path, loss_type: str, sft_weight: float
) -> None:
    """Float32, the same batch; with ``sft_weight`` (RPO) the NLL is the mean over the batch's chosen tokens, as
    TRL's, so only one micro-batch compares (accumulated micro-batches average their own means)."""
    beta = 0.5
    prepare_pairs(tmp_path, PAIRS, val_fraction=0.0)
    batch = open_examples(tmp_path / "data", "train", BLOCK).batch(np.arange(len(PAIRS)))
    examples = list(map(trl_ids, PAIRS))
    expected_loss, expected_norm, expected_rewards = trl_loss_and_grad_norm(
        *hf_pair, examples, beta, sft_weight, loss_type
    )

    policy, reference = (load_hf_gpt2(d) for d in hf_pair)
    codec = ParamCodec(policy.config)
    schedule = learning_rate_schedule(1e-3, 1e-3, 0, 10)
    tx = make_optimizer(schedule)
    step = jax.jit(make_train_step(codec, tx, schedule, objective=DPO(beta, sft_weight, loss_type)))
    for accum in (1, 2) if not sft_weight else (1,):  # accumulated micro-batches give the same means
        state = init_train_state(codec.to_flat(policy), tx, seed=0)
        micro = {k: v.reshape(accum, len(PAIRS) // accum, BLOCK) for k, v in batch.items()}
        _, metrics = step(state, micro, codec.to_flat(reference))
        assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
        assert float(metrics["grad_norm"]) == pytest.approx(expected_norm, rel=1e-5)
        for name, value in expected_rewards.items():
            assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert expected_rewards["rewards/accuracies"] not in (0.0, 1.0)  # the two models disagree on some pairs


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    """A learnable preference set: every chosen reply signs off with ' Cheers!', the rejected one does not."""
    folder = tmp_path_factory.mktemp("pairs")
    lines = [
        {"prompt": f"Add {a} and {a + 1}.", "chosen": f"{2 * a + 1}. Cheers!", "rejected": f"{2 * a + 1}."}
        for a in range(40)
    ]
    prepare_pairs(folder, lines, val_fraction=0.1)
    return folder / "data"  # fmt: skip


def test_training_starts_at_the_reference_and_meshes_agree(
    pair_dir: Path, hf_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    def run_losses(out: str, *extra: str) -> list[dict]:
        args = ["--preset", "dpo", "--init_from", str(hf_pair[0]), "--data_dir", str(pair_dir), "--batch_size", "8"]
        config = parse_run_config(
            [*args, "--out_dir", str(tmp_path / out), "--lr", "1e-3", "--dpo_beta", "0.5", *extra]
        )
        run = setup(config, jax.devices()[:1] if config.train_config.mesh == "1x1" else None, DPO(0.5))
        run.checkpointer.close()
        records = []
        for _ in range(3):
            run.state, metrics = run.step.fn(run.state, next_batch(run))
            records.append({k: float(v) for k, v in metrics.items()})
        return records

    reference = run_losses("ref", "--mesh", "1x1", "--grad_accum", "2")
    assert reference[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: the policy is the reference
    assert reference[0]["rewards/margins"] == 0.0 and reference[-1]["rewards/margins"] > 0
    assert reference[-1]["loss"] < reference[0]["loss"]
    sharded = run_losses("mesh", "--mesh", "4x2", "--grad_accum", "2", "--fsdp")
    for got, want in zip(sharded, reference, strict=True):
        for name in ("loss", "grad_norm", "rewards/chosen", "rewards/margins"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name


def test_train_cli_logs_trl_metrics_and_resumes_against_the_same_reference(
    pair_dir: Path, hf_pair, tmp_path: Path
) -> None:
    out = tmp_path / "dpo"
    args = ["--preset", "dpo", "--init_from", str(hf_pair[0]), "--data_dir", str(pair_dir), "--out_dir", str(out)]
    args += ["--batch_size", "4", "--lr", "1e-3", "--log_interval", "1", "--eval_interval", "2", "--eval_iters", "1"]
    first = run_train_cli([*args, "--max_steps", "2", "--save_interval", "2"])
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_train_cli([*args, "--max_steps", "4"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged_losses(out)[1] == pytest.approx(math.log(2), abs=1e-6)
    for record in records:
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= record.keys()
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4] and "val_rewards/accuracies" in evaluated[-1]
    # the reference stays the init_from weights after the resume: the margins keep growing from there
    assert records[-1]["rewards/margins"] > records[1]["rewards/margins"] > 0
    wrong = run_train_cli(
        [
            "--preset",
            "sft",
            "--init_from",
            str(hf_pair[0]),
            "--data_dir",
            str(pair_dir),
            "--out_dir",
            str(tmp_path / "x"),
        ]
    )
    assert wrong.returncode == 2 and "preference pairs: train on them with --preset dpo" in wrong.stderr  # fmt: skip
