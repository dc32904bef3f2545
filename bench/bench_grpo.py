"""Learning from feedback on this CPU: GRPO raises held-out pass@1 on arithmetic word problems.

python -m bench.bench_grpo [--work DIR] [--reuse_sft]   # from the repo root

A small model with a byte-level tokenizer (digits are tokens) is SFT'd from scratch on synthetic
word problems on two-digit numbers, answered in column steps and GSM8K's form ("Ada has 56 pens and
buys 37 more. How many now?" -> "6 + 7 = 13, carry 1; 5 + 3 + 1 = 9\n#### 93") by a careless teacher
that forgets the carry in ``--careless`` of its answers: SFT learns its mistakes. From that
checkpoint the same wall-clock time goes once to GRPO (``python -m jaxgpt.rl``, reward: exact match
of the final number) and once to more SFT on the same answers.
Printed: greedy pass@1 on held-out problems after SFT, after GRPO and after the
extra SFT (what the reward adds over more supervised steps). Each stage runs the real command lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.bench_rl import ROOT, sh, write_jsonl
from jaxgpt.checkpoints.run_dir import read_metrics

BLOCK = 128
REPLY_TOKENS = 48  # the longest worked answer is 40 bytes
MODEL = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", str(BLOCK), "--dropout", "0",
         "--position_embedding", "rotary", "--norm", "rmsnorm", "--norm_scale", "false", "--activation", "relu2",
         "--bias", "false", "--zero_init_proj", "true", "--tie_embeddings", "false"]  # fmt: skip
CARRY_SHARE = 0.75  # problems with a carry or borrow: where a careless answer differs from a right one
NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")
ITEMS = ("pens", "apples", "coins", "books", "shells", "stamps")


def column_steps(a: int, b: int, add: bool, careless: bool) -> tuple[str, int]:
    """The worked column sum or difference of two two-digit numbers, units first, and its result.

    ``careless`` forgets the carry (or the borrow) as a hurried student does: "6 + 7 = 13; 5 + 3 = 8"
    then "#### 83" for 56 + 37. Without a carry or borrow it changes nothing.
    """
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    if add:
        carry = int(a0 + b0 >= 10 and not careless)
        tens = a1 + b1 + carry
        units = f"{a0} + {b0} = {a0 + b0}" + (", carry 1" if carry else "")
        return units + f"; {a1} + {b1}" + (" + 1" if carry else "") + f" = {tens}", 10 * tens + (a0 + b0) % 10
    borrow = int(a0 < b0)
    kept = borrow and not careless
    units = f"{a0 + 10 * borrow} - {b0} = {a0 + 10 * borrow - b0}" + (", borrow 1" if kept else "")
    tens = a1 - b1 - kept
    return units + f"; {a1}" + (" - 1" if kept else "") + f" - {b1} = {tens}", 10 * tens + a0 + 10 * borrow - b0


def problems(n: int, seed: int, careless: float = 0.0, exclude: frozenset = frozenset()) -> list[dict]:
    """Word problems on two-digit numbers (results of two or three digits), ``CARRY_SHARE`` of them with a
    carry or borrow, with a worked answer (``response``, careless in a ``careless`` share of them) and the
    true result GRPO's reward checks (``answer``); none asks a sum or difference in ``exclude``."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = sorted(rng.integers(10, 100, size=2).tolist(), reverse=True)
        add, sloppy, carry = (bool(rng.random() < p) for p in (0.5, careless, CARRY_SHARE))
        if (a, b, add) in exclude or carry != (a % 10 + b % 10 >= 10 if add else a % 10 < b % 10):
            continue
        if add:
            prompt, answer = f"{name} has {a} {item} and buys {b} more. How many now?", a + b
        else:
            prompt, answer = f"{name} has {a} {item} and gives away {b}. How many are left?", a - b
        work, result = column_steps(a, b, add, sloppy)
        assert sloppy or result == answer, (a, b, add, work, result)
        out.append({"prompt": prompt, "response": f"{work}\n#### {result}", "answer": answer, "key": (a, b, add)})
    return out


def pass_at_1(run_dir: Path, held_out: Path) -> float:
    from jaxgpt.checkpoints.loading import load_model
    from jaxgpt.rl.grpo import pass_at_1 as greedy_pass_at_1
    from jaxgpt.rl.rewards import exact_match, read_prompts
    from jaxgpt.tokenizer import tokenizer_of

    records = read_prompts(str(held_out))
    model, tokenizer = load_model(str(run_dir)), tokenizer_of(str(run_dir))
    return greedy_pass_at_1(model, records, exact_match, tokenizer, REPLY_TOKENS, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/bench_grpo")
    parser.add_argument("--train_problems", type=int, default=6000)
    parser.add_argument("--careless", type=float, default=0.6, help="share of SFT answers that forget a carry")
    parser.add_argument("--sft_epochs", type=float, default=4)
    parser.add_argument("--grpo_steps", type=int, default=150)
    parser.add_argument("--grpo_lr", default="3e-4")
    parser.add_argument("--grpo_min_lr", default="1e-4")
    parser.add_argument("--group_size", default="8")
    parser.add_argument("--prompts_per_step", default="8")
    parser.add_argument("--reuse_sft", action="store_true", help="keep the SFT run already in --work (no SFT time)")
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train = problems(args.train_problems, seed=0, careless=args.careless)
    held_out = problems(200, seed=1, exclude=frozenset(p["key"] for p in train))
    sft_file = write_jsonl(work / "sft.jsonl", [{"prompt": p["prompt"], "response": p["response"]} for p in train])
    prompts = write_jsonl(work / "prompts.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in train])
    held_file = write_jsonl(work / "held_out.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in held_out])
    common = ["--batch_size", "32", "--eval_interval", "0", "--eval_iters", "1", "--log_interval", "50", "--fresh"]
    sft_s = 0.0
    if not args.reuse_sft:
        sh("-m", "jaxgpt.data.prepare", "--num_proc", "1", "--block_size", str(BLOCK), "--val_fraction", "0.05",
           "--input", sft_file, "--format", "chat", "--tokenizer", "train:257",
           "--out_dir", str(work / "data_sft"))  # fmt: skip
        sft_s = sh("train.py", "--preset", "sft", "--init_from", "scratch", *MODEL,
                   "--data_dir", str(work / "data_sft"), "--out_dir", str(work / "sft"),
                   "--epochs", str(args.sft_epochs), "--optimizer", "muon", "--muon_lr", "3e-3",
                   "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "20", *common)  # fmt: skip
    sft_record = [r for r in read_metrics(work / "sft") if "step_ms" in r][-1]
    before = pass_at_1(work / "sft", Path(held_file))
    grpo_s = sh("-m", "jaxgpt.rl", "--init_from", str(work / "sft"), "--out_dir", str(work / "grpo"),
                "--prompts", prompts, "--max_new_tokens", str(REPLY_TOKENS), "--group_size", args.group_size,
                "--prompts_per_step", args.prompts_per_step, "--max_steps", str(args.grpo_steps),
                "--lr", args.grpo_lr, "--min_lr", args.grpo_min_lr, "--eval_interval", "0", "--log_interval", "10",
                "--save_interval", "1000")  # fmt: skip
    after_grpo = pass_at_1(work / "grpo", Path(held_file))
    # More SFT for GRPO's wall time (its start-up and compilation included), at the SFT run's step time.
    extra_steps = max(1, round(grpo_s / (sft_record["step_ms"] / 1000)))
    more_s = sh("train.py", "--preset", "sft", "--init_from", str(work / "sft"), "--data_dir", str(work / "data_sft"),
                "--out_dir", str(work / "more_sft"), "--max_steps", str(extra_steps), "--optimizer", "muon",
                "--muon_lr", "3e-4", "--lr", "3e-4", "--min_lr", "3e-4",
                "--warmup_steps", "0", *common)  # fmt: skip
    after_sft = pass_at_1(work / "more_sft", Path(held_file))
    print("| stage | wall s | held-out pass@1 (greedy) |\n| --- | --- | --- |")
    print(f"| SFT ({args.sft_epochs:g} epochs, {sft_record['step']} steps) | {sft_s:.0f} | {before:.1%} |")
    print(f"| + GRPO ({args.grpo_steps} steps) | {grpo_s:.0f} | {after_grpo:.1%} |")
    print(f"| + SFT instead ({extra_steps} steps) | {more_s:.0f} | {after_sft:.1%} |")
    print(f"GRPO: {100 * (after_grpo - before):+.1f} points; more SFT: {100 * (after_sft - before):+.1f} points")


if __name__ == "__main__":
    main()
