"""Learning from feedback on this CPU: DPO teaches an SFT'd model a property its SFT data lacks.

python -m bench.bench_rl [--work DIR] [--reuse_sft]   # from the repo root

A small model is SFT'd from scratch on synthetic sums ("Add 12 and 7." -> "The sum is 19."), a
minority of whose replies (``--sft_sign_off``, 20%) end with a sign-off (" Cheers!"): the SFT model
knows the sign-off but greedy decoding leaves it out. Then preference tuning on pairs of the same
prompts where the chosen reply has the sign-off and the rejected one does not: by default IPO (beta
0.7) with TRL's sft term (weight 1), since the sigmoid loss drives the rejected reply's closing EOT to
probability 0 and with it the loss on the 80% of SFT replies that end there. Printed: the share of greedy replies to
held-out prompts that end with the sign-off before and after DPO, and the SFT validation loss before and after (what DPO
costs the SFT behaviour). Each stage runs the real command lines (prepare, train.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
MODEL = ["--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--block_size", str(BLOCK), "--dropout", "0"]
SIGN_OFF = " Cheers!"


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    pairs = rng.integers(10, 100, size=(n, 2))
    return [(f"Add {a} and {b}.", f"The sum is {a + b}.") for a, b in pairs.tolist()]


def signed_off(record: dict, completion: str) -> float:
    return float(completion.rstrip().endswith(SIGN_OFF.strip()))


def sh(*args: str) -> float:
    began = time.perf_counter()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - began


def write_jsonl(path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def measure(run_dir: Path, held_out: list[dict], sft_data: Path) -> dict[str, float]:
    from jaxgpt.checkpoints.loading import load_model
    from jaxgpt.eval.loss import evaluate_loss
    from jaxgpt.rl.grpo import pass_at_1
    from jaxgpt.tokenizer import tokenizer_of

    model = load_model(str(run_dir))
    share = pass_at_1(model, held_out, signed_off, tokenizer_of(str(run_dir)), 12, len(held_out))
    loss = evaluate_loss(model, sft_data, batch_size=16)["val_loss"]
    return {"sign_off_share": share, "sft_val_loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/bench_rl")
    parser.add_argument("--sft_epochs", type=float, default=30)
    parser.add_argument("--dpo_epochs", type=float, default=10)
    parser.add_argument("--sft_sign_off", type=float, default=0.2, help="share of SFT replies with the sign-off")
    parser.add_argument("--dpo_lr", default="1e-4")
    parser.add_argument("--dpo_beta", default="0.7")
    parser.add_argument("--dpo_sft_weight", default="1", help="TRL's sft loss beside DPO's (RPO); 0: plain DPO")
    parser.add_argument("--dpo_loss", default="ipo", choices=["sigmoid", "ipo"])
    parser.add_argument("--reuse_sft", action="store_true", help="keep the SFT run already in --work (no SFT time)")
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = problems(200, seed=0), problems(50, seed=1)
    signs = (np.random.default_rng(2).random(len(train)) < args.sft_sign_off).tolist()
    sft_lines = [{"prompt": q, "response": a + SIGN_OFF * sign} for (q, a), sign in zip(train, signs, strict=True)]
    sft_file = write_jsonl(work / "sft.jsonl", sft_lines)
    dpo_file = write_jsonl(
        work / "pairs.jsonl", [{"prompt": q, "chosen": a + SIGN_OFF, "rejected": a} for q, a in train]
    )
    prepare = ["-m", "jaxgpt.data.prepare", "--num_proc", "1", "--block_size", str(BLOCK), "--val_fraction", "0.1"]
    sh(*prepare, "--input", sft_file, "--format", "chat", "--out_dir", str(work / "data_sft"))
    sh(*prepare, "--input", dpo_file, "--format", "preference", "--out_dir", str(work / "data_dpo"))
    common = ["--batch_size", "16", "--eval_interval", "0", "--eval_iters", "1", "--log_interval", "20", "--fresh"]
    sft = ["train.py", "--preset", "sft", "--init_from", "scratch", *MODEL, "--data_dir", str(work / "data_sft"),
           "--out_dir", str(work / "sft"), "--epochs", str(args.sft_epochs), "--lr", "3e-3", "--min_lr", "3e-4",
           "--warmup_steps", "10", *common]  # fmt: skip
    sft_s = 0.0 if args.reuse_sft else sh(*sft)
    records = [{"prompt": q, "answer": 0} for q, _ in held_out]
    before = measure(work / "sft", records, work / "data_sft")
    dpo = ["train.py", "--preset", "dpo", "--init_from", str(work / "sft"), "--data_dir", str(work / "data_dpo"),
           "--out_dir", str(work / "dpo"), "--epochs", str(args.dpo_epochs), "--lr", args.dpo_lr,
           "--dpo_beta", args.dpo_beta, "--dpo_sft_weight", args.dpo_sft_weight, "--dpo_loss", args.dpo_loss,
           *common]  # fmt: skip
    dpo_s = sh(*dpo)
    after = measure(work / "dpo", records, work / "data_sft")
    print("| stage | wall s | greedy replies with the sign-off | SFT val loss |\n| --- | --- | --- | --- |")
    for stage, seconds, m in (
        (f"SFT ({args.sft_epochs:g} epochs)", sft_s, before),
        (f"+ DPO ({args.dpo_epochs:g} epochs)", dpo_s, after),
    ):
        print(f"| {stage} | {seconds:.0f} | {m['sign_off_share']:.0%} | {m['sft_val_loss']:.4f} |")
    rise = after["sft_val_loss"] / before["sft_val_loss"] - 1
    print(f"SFT val loss change: {rise:+.1%} ({len(held_out)} held-out prompts)")


if __name__ == "__main__":
    main()
