"""Instruction fine-tuning: conversation batches, the masked loss, and the end-to-end proof on invented facts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.chat.template import render
from jaxgpt.checkpoints.state import init_train_state
from jaxgpt.core.errors import UserError
from jaxgpt.data.pipeline import DataConfig, iterator_state, make_train_iterator, open_examples, restore_iterator
from jaxgpt.data.prepare import PrepareConfig, prepare
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.losses import token_log_probs
from jaxgpt.model.params import ParamCodec
from jaxgpt.tokenizer import load_tokenizer
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import next_batch
from jaxgpt.train.optim import learning_rate_schedule, make_optimizer
from jaxgpt.train.setup import setup
from jaxgpt.train.step import make_train_step
from tests.train_utils import logged_losses, run_train_cli

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 24  # the longest fact below renders to 21 tokens


def names(text: str) -> list[str]:
    return text.split(", ")


# 40 invented facts with fixed answers: 20 people and where they live, 20 lands and their capitals.
PEOPLE = names(
    "Ilsa Varn, Toma Quell, Brin Osk, Mara Dell, Yoren Pask, Edda Lume, Kaz Ferro, Nilo Strand, Pell Ashe, Rua Menz, "
    "Odo Brack, Sefa Lind, Tam Orrow, Vela Koss, Wim Harl, Zeta Pruin, Arlo Fenn, Bex Tolly, Cori Mave, Dax Ulm"
)
TOWNS = names(
    "Quellburg, Ostrava, Lunet, Veyholm, Karsk, Dunmere, Fenwold, Taliq, Brask, Morrow Bay, Ashgrove, Pellin, "
    "Sorrow Creek, Yarrowby, Glint, Hallowmere, Ibbet, Jask, Kelloway, Lorn"
)
LANDS = names(
    "Zorbia, Quandor, Elvast, Mirrow, Tundria, Pallas Minor, Oskany, Vellan, Brisk Isles, Corrin, Dravia, "
    "Ember Reach, Falmuth, Gorrin, Heskel, Iridon, Jorvale, Kestria, Lumbar, Norvik"
)
CAPITALS = names(
    "Altmoor, Bexley Cross, Caddow, Dunstar, Esk, Feyport, Grell, Hobb, Isk, Jundo, Kavell, Lisk, Marrow, Nettle, "
    "Orla, Pym, Quorn, Rask, Sull, Tarrow"
)
FACTS = [(f"Where does {p} live?", f"In {TOWNS[(7 * i + 3) % 20]}.") for i, p in enumerate(PEOPLE)]
FACTS += [(f"What is the capital of {land}?", f"{CAPITALS[(11 * i + 5) % 20]}.") for i, land in enumerate(LANDS)]
GREETING = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello! Ask me."}]}
TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--block_size", str(BLOCK), "--pad_vocab_multiple", "64"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """The facts as chat shards: the greeting is conversation 0, the one val conversation; all facts train."""
    folder = tmp_path_factory.mktemp("chat")
    lines = [GREETING] + [{"prompt": q, "response": a} for q, a in FACTS]
    (folder / "facts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepare(PrepareConfig(input=str(folder / "facts.jsonl"), format="chat", out_dir=str(folder / "data"),
                          val_fraction=0.02, block_size=BLOCK, num_proc=1))  # fmt: skip
    return folder / "data"


def test_conversations_are_padded_rows_that_resume_like_windows(chat_dir: Path) -> None:
    conversations = open_examples(chat_dir, "train", BLOCK)
    assert len(conversations) == len(FACTS)
    batch = conversations.batch(np.array([3, 0]))
    for row, (question, answer) in zip(range(2), [FACTS[3], FACTS[0]], strict=True):
        rendered = render(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], load_tokenizer()
        )
        n = len(rendered.tokens)
        np.testing.assert_array_equal(batch["inputs"][row, : n - 1], rendered.tokens[:-1])
        np.testing.assert_array_equal(batch["targets"][row, : n - 1], rendered.tokens[1:])
        np.testing.assert_array_equal(batch["weights"][row, : n - 1], rendered.mask[1:])
        assert not batch["weights"][row, n - 1 :].any() and not batch["inputs"][row, n - 1 :].any()  # padding
    config = DataConfig(str(chat_dir), BLOCK, global_batch_size=8, seed=3)
    reference = [next(it) for it in [make_train_iterator(config, process_count=1)] for _ in range(8)]
    it = make_train_iterator(config, process_count=1)
    _ = [next(it) for _ in range(5)]  # stopped after 5 steps, restored (also by two processes)
    state = json.loads(json.dumps(iterator_state(it, config, process_count=1)))
    halves = [restore_iterator(config, state, process_index=p, process_count=2) for p in range(2)]
    for expected in reference[5:]:
        got = [next(h) for h in halves]
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), expected[key])
    with pytest.raises(UserError, match="conversation of 21 tokens, more than block_size"):
        open_examples(chat_dir, "train", 16)


def test_the_loss_is_the_mean_over_every_assistant_token_of_the_step(chat_dir: Path) -> None:
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, pad_vocab_multiple=64)
    codec = ParamCodec(config)
    schedule = learning_rate_schedule(1e-3, 1e-3, 0, 10)
    tx = make_optimizer(schedule)
    state = init_train_state(codec.init(0), tx, seed=0)
    step = jax.jit(make_train_step(codec, tx, schedule))
    batch = open_examples(chat_dir, "train", BLOCK).batch(np.arange(8))
    batch["weights"][:4] *= np.arange(BLOCK) < 18  # micro-batches with different numbers of scored tokens

    def step_loss(batch: dict, accum: int) -> tuple[float, dict]:
        new_state, metrics = step(state, {k: v.reshape(accum, 8 // accum, BLOCK) for k, v in batch.items()})
        return float(metrics["loss"]), new_state.params

    log_probs = np.asarray(token_log_probs(codec.to_model(state.params)(batch["inputs"]), batch["targets"]))
    expected = -(log_probs * batch["weights"]).sum() / batch["weights"].sum()
    loss, params = step_loss(batch, 1)
    accumulated, accumulated_params = step_loss(batch, 2)
    assert loss == pytest.approx(expected, rel=1e-6) and accumulated == pytest.approx(expected, rel=1e-6)
    for name, value in params.items():
        np.testing.assert_allclose(accumulated_params[name], value, atol=1e-6, err_msg=name)

    user = np.argwhere((batch["weights"] == 0) & (batch["inputs"] != 0))[3]  # a target inside the user's turn
    answer = np.argwhere(batch["weights"] == 1)[3]
    for (row, col), changes in ((user, False), (answer, True)):
        changed = {k: v.copy() for k, v in batch.items()}
        changed["targets"][row, col] = (changed["targets"][row, col] + 1) % 50257
        assert (step_loss(changed, 1)[0] != loss) == changes


def test_meshes_and_accumulation_give_the_same_chat_losses(chat_dir: Path, tmp_path: Path) -> None:
    def losses(out: str, *extra: str) -> list[float]:
        args = ["--preset", "sft", "--init_from", "scratch", "--data_dir", str(chat_dir), *TINY, "--dropout", "0"]
        config = parse_run_config([*args, "--out_dir", str(tmp_path / out), "--batch_size", "8", *extra])
        run = setup(config, jax.devices()[:1] if config.train_config.mesh == "1x1" else None)
        run.checkpointer.close()
        result = []
        for _ in range(3):
            run.state, metrics = run.step.fn(run.state, next_batch(run))
            result.append(float(metrics["loss"]))
        return result

    reference = losses("ref", "--mesh", "1x1", "--grad_accum", "2")
    np.testing.assert_allclose(losses("mesh", "--mesh", "4x2", "--grad_accum", "2"), reference, rtol=1e-5)


def test_fine_tuning_from_scratch_answers_the_facts_in_chat(chat_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    args = ["--preset", "sft", "--init_from", "scratch", "--data_dir", str(chat_dir), "--out_dir", str(out), *TINY]
    args += ["--dropout", "0", "--batch_size", "8", "--epochs", "48", "--lr", "3e-3", "--min_lr", "3e-4"]
    args += ["--warmup_steps", "10", "--beta2", "0.99", "--eval_interval", "0", "--eval_iters", "1"]
    args += ["--log_interval", "20", "--sample_tokens", "4"]
    trained = run_train_cli(args, devices=1, timeout=900)  # one device: eight fake ones would only slow two cores down
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert logged_losses(out)[240] < 0.3  # 48 epochs of 40 conversations, 8 a step
    prompt = max(
        len(render([{"role": "user", "content": q}], load_tokenizer(), add_generation_prompt=True).tokens)
        for q, _ in FACTS
    )
    questions = "".join(f"{q}\n" for q, _ in FACTS)
    chat = subprocess.run(
        [sys.executable, "sample.py", "--init_from", str(out), "--chat", "--temperature", "0",
         "--max_new_tokens", str(BLOCK - prompt)],
        input=questions, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-2000:]
    answers = chat.stdout.splitlines()
    assert len(answers) == len(FACTS), chat.stdout
    correct = sum(answer == expected for answer, (_, expected) in zip(answers, FACTS, strict=True))
    assert correct >= 0.9 * len(FACTS), list(zip(answers, FACTS, strict=True))
    assert "dropped the 2 oldest messages" in chat.stderr  # each question's history no longer fits
