"""The Quick start before and after issue 21, side by side: wall time, val bits per byte, a sample.

    python -m bench.bench_quickstart                 # both at once (each sees the same load), then eval
    python -m bench.bench_quickstart --sequential    # one after the other (a quiet machine)

Each recipe runs as a user runs it, as subprocesses from the repository root: ``prepare`` (GPT-2's
tokenizer, or one of 4,096 tokens trained on the corpus), then ``python train.py`` (the
``shakespeare-gpt2`` preset, today's ``shakespeare``), each timed whole (start-up, compilation,
evaluations and checkpoints included). Then ``python -m jaxgpt.eval`` scores every val token of each
run (bits per byte over the val split's UTF-8 bytes, so the two tokenizers compare) and ``sample.py``
prints 60 tokens after "ROMEO:". Run together, the faster recipe finishes first and leaves the
machine to the other: the old recipe's time is then, if anything, flattered.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {  # name: (prepare flags, train.py flags)
    "before (shakespeare-gpt2)": (["--tokenizer", "gpt2"], ["--preset", "shakespeare-gpt2"]),
    "after (shakespeare)": (["--tokenizer", "train:4096"], []),
}


def command(args: list[str], log: Path) -> float:
    """Runs ``python ARGS`` in the repository, appending its output to ``log``; returns its wall time."""
    start = time.perf_counter()
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed; see {log}")
    return time.perf_counter() - start


def recipe(name: str, corpus: str, work: Path, times: dict[str, tuple[float, float]]) -> None:
    prepare_flags, train_flags = RECIPES[name]
    data, out, log = work / "data", work / "out", work / "log.txt"
    work.mkdir(parents=True, exist_ok=True)
    prepare = command(["-m", "jaxgpt.data.prepare", "--input", corpus, "--out_dir", str(data), *prepare_flags], log)
    train = command(["train.py", *train_flags, "--data_dir", str(data), "--out_dir", str(out)], log)
    times[name] = (prepare, train)
    print(f"{name}: prepare {prepare:.0f} s, train {train:.0f} s", flush=True)


def evaluate(name: str, work: Path) -> tuple[float, float, str]:
    """(val loss, val bits per byte) over the whole val split, and a sample."""
    result = subprocess.run(
        [sys.executable, "-m", "jaxgpt.eval", "--init_from", str(work / "out"), "--val_data", str(work / "data")],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = dict(line.split()[:2] for line in result.stdout.splitlines() if line.startswith(("val_loss", "val_bpb")))
    sample = subprocess.run(
        [sys.executable, "sample.py", "--init_from", str(work / "out"), "--prompt", "ROMEO:", "--max_new_tokens", "60"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(rows["val_loss"]), float(rows["val_bpb"]), sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--sequential", action="store_true", help="run the recipes one after the other")
    parser.add_argument("--work_dir", default=None, help="keep data, runs and logs here (default: a temporary folder)")
    args = parser.parse_args()
    times: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work_dir or tmp)
        works = {name: root / f"recipe{i}" for i, name in enumerate(RECIPES)}
        threads = [threading.Thread(target=recipe, args=(n, args.input, w, times)) for n, w in works.items()]
        for thread in threads:
            thread.start()
            if args.sequential:
                thread.join()
        for thread in threads:
            thread.join()
        if len(times) != len(RECIPES):
            raise SystemExit("a recipe failed")
        results = {name: evaluate(name, work) for name, work in works.items()}
    print("\n| recipe | prepare | train | val loss (nats/token) | val bits per byte |\n| --- | --- | --- | --- | --- |")
    for name, (loss, bpb, _) in results.items():
        prepare, train = times[name]
        print(f"| {name} | {prepare:.0f} s | {train:.0f} s | {loss:.4f} | {bpb:.4f} |")
    for name, (_, _, sample) in results.items():
        print(f"\n--- {name}: sample after 'ROMEO:' ---\n{sample.strip()}")


if __name__ == "__main__":
    main()
